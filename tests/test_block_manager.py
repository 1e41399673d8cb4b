from pdcli.engine.block_manager import BlockManager
from pdcli.engine.sequence import Sequence
from pdcli.sampling_params import SamplingParams


def seq(n: int, start: int = 0) -> Sequence:
    return Sequence("r", list(range(start, start + n)), SamplingParams(), seed=0)


def test_allocate_grow_free():
    bm = BlockManager(8, 4)
    s = seq(10)
    assert bm.allocate(s, 10)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    s.num_computed_tokens = 10
    assert bm.allocate(s, 2)  # 12 tokens still fit in 3 blocks
    assert len(s.block_table) == 3
    assert bm.allocate(s, 3)
    assert len(s.block_table) == 4
    bm.free_seq(s)
    assert bm.num_free_blocks == 8 and s.block_table == []


def test_allocate_refuses_when_full_and_leaves_state():
    bm = BlockManager(2, 4)
    s = seq(12)
    assert not bm.allocate(s, 12)
    assert s.block_table == [] and bm.num_free_blocks == 2


def test_fork_shares_blocks_and_copy_on_write():
    bm = BlockManager(8, 4)
    parent = seq(6)
    bm.allocate(parent, 6)
    parent.num_computed_tokens = 6
    parent.append_token(100)
    child = parent.fork(1)
    bm.fork(parent, child)
    assert child.block_table == parent.block_table
    assert all(bm.ref_count[b] == 2 for b in parent.block_table)
    # the child writes position 6, inside the shared partial block 1: it gets its own copy
    shared = parent.block_table[1]
    assert bm.allocate(child, 1)
    assert bm.pending_copies == [(shared, child.block_table[1])]
    assert child.block_table[0] == parent.block_table[0] and child.block_table[1] != shared
    assert bm.ref_count[shared] == 1
    bm.pending_copies.clear()
    assert bm.allocate(parent, 1)  # now sole owner: no copy
    assert bm.pending_copies == []
    bm.free_seq(parent)
    bm.free_seq(child)
    assert bm.num_free_blocks == 8


def test_prefix_cache_hit_reuse_and_eviction():
    bm = BlockManager(4, 4)
    a = seq(9)
    bm.allocate(a, 9)
    a.num_computed_tokens = 9
    bm.cache_full_blocks(a)
    assert len(bm.block_of_hash) == 2
    b = seq(11)  # same first 8 tokens
    hit = bm.match_prefix(b)
    assert hit == a.block_table[:2]
    assert bm.allocate(b, 3, hit)
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert bm.ref_count[hit[0]] == 2
    bm.free_seq(a)
    bm.free_seq(b)
    assert bm.num_free_blocks == 4
    # freed cached blocks stay matchable until reused
    assert bm.match_prefix(seq(9)) == hit
    c = seq(16, start=50)  # needs all 4 blocks: evicts the cached ones
    assert bm.allocate(c, 16)
    assert bm.block_of_hash == {}
    bm.free_seq(c)
    assert bm.match_prefix(seq(9)) == []


def test_whole_prompt_cached_still_recomputes_last_token():
    bm = BlockManager(8, 4)
    a = seq(8)
    bm.allocate(a, 8)
    a.num_computed_tokens = 8
    bm.cache_full_blocks(a)
    assert len(bm.match_prefix(seq(8))) == 1  # (8 - 1) // 4 blocks: the last token needs logits


def test_can_allocate_counts_cached_free_blocks():
    bm = BlockManager(3, 4)
    a = seq(8)
    bm.allocate(a, 8)
    a.num_computed_tokens = 8
    bm.cache_full_blocks(a)
    bm.free_seq(a)
    b = seq(13)
    hit = bm.match_prefix(b)
    assert len(hit) == 2
    # 2 cached (free) blocks are taken back, 2 more are needed for 13 tokens: only 3 in all
    assert not bm.can_allocate(b, 5, hit)
    assert bm.can_allocate(b, 4, hit)
