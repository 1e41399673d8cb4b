from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from pdcli.engine.sequence import Sequence


def block_hash(parent: bytes | None, token_ids: list[int]) -> bytes:
    """Chained hash of a full block: equal hashes mean equal prefixes up to this block."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


class BlockManager:
    """Fixed-size KV blocks with ref counts, copy-on-write forks and hash-based prefix caching.

    Invariant: a block is in `free` iff its ref count is 0. Free blocks keep their hash until they
    are reused, so a later prompt with the same prefix can take them back (LRU eviction order).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.block_of_hash: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.seq_hashes: dict[int, list[bytes]] = {}  # seq_id -> hashes of its full, computed blocks
        self.num_prefix_hits = 0  # blocks served from the cache, for tests and metrics
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) block copies for the next step

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)


    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take(self, block: int) -> None:
        if self.ref_count[block] == 0:
            del self.free[block]
        self.ref_count[block] += 1

    def _new_block(self) -> int:
        block, _ = self.free.popitem(last=False)
        if self.hash_of[block] is not None:
            del self.block_of_hash[self.hash_of[block]]
            self.hash_of[block] = None
        self.ref_count[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.ref_count[block] -= 1
        assert self.ref_count[block] >= 0, f"block {block} freed twice"
        if self.ref_count[block] == 0:
            self.free[block] = None

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks for the longest full-block prefix of seq; the last token is always recomputed."""
        if not self.enable_prefix_caching:
            return []
        blocks, parent = [], None
        num_full = (len(seq) - 1) // self.block_size
        for i in range(num_full):
            parent = block_hash(parent, seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            block = self.block_of_hash.get(parent)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        if cached_blocks:
            num_computed, num_have = len(cached_blocks) * self.block_size, len(cached_blocks)
        else:
            num_computed, num_have = seq.num_computed_tokens, len(seq.block_table)
        need = self.num_blocks_for(num_computed + num_new_tokens) - num_have
        need += sum(self.ref_count[b] == 0 for b in cached_blocks) + self._needs_cow(seq)
        return need <= len(self.free)

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Grow seq's block table to hold its computed tokens plus num_new_tokens, copying a shared
        block it will write into (the copy goes to `pending_copies`). False if the pool is full."""
        table = seq.block_table
        if (not cached_blocks and seq.num_computed_tokens + num_new_tokens <= len(table) * self.block_size
                and self.ref_count[table[seq.num_computed_tokens // self.block_size]] == 1):
            return True  # fits in blocks it owns alone: the common decode step
        if not self.can_allocate(seq, num_new_tokens, cached_blocks):
            return False
        if cached_blocks:
            assert not seq.block_table
            for block in cached_blocks:
                self._take(block)
            seq.block_table = list(cached_blocks)
            seq.num_computed_tokens = seq.num_cached_tokens = len(cached_blocks) * self.block_size
            self.num_prefix_hits += len(cached_blocks)
            self.seq_hashes[seq.seq_id] = [self.hash_of[b] for b in cached_blocks]
        if self._needs_cow(seq):
            i = seq.num_computed_tokens // self.block_size
            src, dst = seq.block_table[i], self._new_block()
            self._release(src)
            seq.block_table[i] = dst
            self.pending_copies.append((src, dst))
        need = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        seq.block_table.extend(self._new_block() for _ in range(need))
        return True

    def _needs_cow(self, seq: Sequence) -> bool:
        i = seq.num_computed_tokens // self.block_size
        return i < len(seq.block_table) and self.ref_count[seq.block_table[i]] > 1

    def fork(self, parent: Sequence, child: Sequence) -> None:
        for block in parent.block_table:
            self._take(block)
        child.block_table = list(parent.block_table)
        self.seq_hashes[child.seq_id] = list(self.seq_hashes.get(parent.seq_id, []))

    def free_seq(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table = []
        seq.num_computed_tokens = 0
        self.seq_hashes.pop(seq.seq_id, None)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the hashes of seq's blocks that are full and computed."""
        if not self.enable_prefix_caching:
            return
        hashes = self.seq_hashes.setdefault(seq.seq_id, [])
        num_full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size  # known tokens only
        if num_full <= len(hashes):
            return
        for i in range(len(hashes), num_full):
            h = block_hash(hashes[-1] if hashes else None,
                           seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            hashes.append(h)
            block = seq.block_table[i]
            if h not in self.block_of_hash and self.hash_of[block] is None:
                self.block_of_hash[h] = block
                self.hash_of[block] = h
