"""Which prompt prefixes each worker holds, as the coordinator can know them: the chained block hashes of
the prompts it sent there (the engine's prefix cache keys its blocks the same way), most recent kept,
bounded by the worker's pool (an approximation of its cache, as SGLang's cache-aware router keeps one)."""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


def prompt_hashes(prompt_ids: list[int], block_size: int) -> list[bytes]:
    """The hashes of the prompt's full blocks, in order (engine.block_manager.block_hash chained, the prompt
    turned into bytes once)."""
    n = len(prompt_ids) // block_size
    data, step = np.asarray(prompt_ids[:n * block_size], dtype=np.int64).tobytes(), block_size * 8
    out, parent = [], b""
    for i in range(n):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(data[i * step:(i + 1) * step])
        parent = h.digest()
        out.append(parent)
    return out


class PrefixIndex:
    def __init__(self, block_size: int, capacity: dict[int, int]):
        """capacity: rank -> blocks in its KV pool."""
        self.block_size, self.capacity = block_size, capacity
        self.held: dict[int, OrderedDict] = {rank: OrderedDict() for rank in capacity}

    def cached_tokens(self, rank: int, hashes: list[bytes]) -> int:
        """Prompt tokens a worker would find cached: its leading run of known blocks (the engine computes at
        least the last token, so a whole prompt never counts as cached)."""
        held, n = self.held.get(rank, {}), 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return min(n * self.block_size, max(0, len(hashes) * self.block_size - 1))

    def add(self, rank: int, hashes: list[bytes]) -> None:
        held = self.held.setdefault(rank, OrderedDict())
        for h in hashes:
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.capacity.get(rank, len(held)):
            held.popitem(last=False)
