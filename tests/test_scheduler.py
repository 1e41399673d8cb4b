import pytest

from pdcli.config import SchedulerConfig
from pdcli.engine.block_manager import BlockManager
from pdcli.engine.scheduler import Scheduler
from pdcli.engine.sequence import Sequence
from pdcli.sampling_params import SamplingParams


def make(num_blocks=64, block_size=4, **kw):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(**kw), bm, max_model_len=1000, eos_token_ids={2}), bm


def seq(n, rid="r", max_tokens=100, start=3):
    return Sequence(rid, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens, ignore_eos=False), seed=0)


def run_step(s, token=7):
    out = s.schedule()
    sampled = [[token] if seq.num_computed_tokens + n == len(seq) else [] for seq, n in zip(out.seqs, out.num_new_tokens)]
    s.advance(out)  # launched
    s.update(out, sampled)  # landed
    return out


def test_chunked_prefill_respects_budget_and_mixes_decodes():
    s, _ = make(max_num_batched_tokens=8)
    a, b = seq(3, "a"), seq(20, "b")
    s.add(a)
    s.add(b)
    out = run_step(s)
    assert out.num_new_tokens == [3, 5]  # a whole, b's first chunk
    out = run_step(s)
    assert [x.request_id for x in out.seqs] == ["a", "b"] and out.num_new_tokens == [1, 7]  # a decodes beside b's chunk
    out = run_step(s)
    assert out.num_new_tokens == [1, 7]
    out = run_step(s)
    assert out.num_new_tokens == [1, 1]  # b's last token (1) + a's decode; b sampled
    assert b.num_output_tokens == 1


def test_max_num_seqs_caps_admission():
    s, _ = make(max_num_seqs=2)
    for i in range(3):
        s.add(seq(4, str(i)))
    out = s.schedule()
    assert len(out.seqs) == 2 and len(s.waiting) == 1


def test_preempts_latest_and_resumes_first():
    s, bm = make(num_blocks=4, block_size=4, max_num_batched_tokens=64, admission_reserve=0.0)
    a, b = seq(7, "a"), seq(7, "b", start=50)  # no shared prefix
    s.add(a)
    s.add(b)
    run_step(s)  # both prefilled: 2 blocks each, pool empty
    run_step(s)  # both decode position 7, the last slot of their 2nd block
    assert bm.num_free_blocks == 0
    out = run_step(s)  # a needs a 3rd block for position 8: b (latest) is preempted
    assert [x.request_id for x in out.seqs] == ["a"]
    assert s.waiting[0] is b and b.num_computed_tokens == 0 and b.block_table == []
    assert s.num_preemptions == 1


def test_finish_reasons_and_blocks_returned():
    s, bm = make()
    a = seq(4, "a", max_tokens=2)
    s.add(a)
    run_step(s)
    run_step(s)
    assert a.is_finished and a.finish_reason == "length" and a.num_output_tokens == 2
    b = seq(4, "b")
    s.add(b)
    run_step(s, token=2)  # EOS
    assert b.finish_reason == "stop"
    assert bm.num_free_blocks == 64 and not s.has_unfinished()


def test_abort_frees_blocks():
    s, bm = make()
    a = seq(10, "a")
    s.add(a)
    run_step(s)
    s.abort("a")
    assert a.finish_reason == "abort" and bm.num_free_blocks == 64


@pytest.mark.parametrize("bad", [dict(max_num_seqs=0), dict(max_num_batched_tokens=0), dict(max_model_len=0)])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        SchedulerConfig(**bad)


def test_pending_token_is_scheduled_before_it_lands():
    s, bm = make()
    a, b = seq(6, "a", max_tokens=3), seq(5, "b", max_tokens=1)
    s.add(a), s.add(b)
    first = s.schedule()
    s.advance(first)  # launched, tokens not landed
    assert (a.num_pending, len(a), len(a.token_ids)) == (1, 7, 6)
    second = s.schedule()  # b's only token is in flight: b is not scheduled again
    assert [(q.request_id, n) for q, n in zip(second.seqs, second.num_new_tokens)] == [("a", 1)]
    s.advance(second)
    assert a.num_pending == 2
    s.update(first, [[7], [8]])
    assert b.is_finished and b.finish_reason == "length" and a.token_ids[-1] == 7 and a.num_pending == 1
    s.update(second, [[2]])  # eos
    assert a.is_finished and a.output_token_ids == [7, 2] and a.num_pending == 0
    assert bm.num_free_blocks == bm.num_blocks


def test_finished_while_in_flight_drops_the_row():
    s, bm = make()
    a = seq(4, "a", max_tokens=10)
    s.add(a)
    run_step(s)
    out = s.schedule()
    s.advance(out)
    s.abort("a")  # e.g. a client left, or a stop string matched, with a step in flight
    assert s.update(out, [[9]]) == [] and a.output_token_ids == [7]
    assert bm.num_free_blocks == bm.num_blocks


def test_admission_reserve_waits_for_room_and_learns():
    s, bm = make(num_blocks=8, block_size=4, max_num_batched_tokens=64)
    a, b = seq(6, "a", max_tokens=10), seq(6, "b", max_tokens=10, start=50)
    s.add(a), s.add(b)
    out = run_step(s)  # a will need 16 tokens = 4 blocks, b 4 more: 8 in all, so both fit
    assert [x.request_id for x in out.seqs] == ["a", "b"]
    c = seq(6, "c", max_tokens=10, start=90)
    s.add(c)
    run_step(s)
    assert c in s.waiting  # no room left once a and b are expected to finish
    while not a.is_finished:
        run_step(s)
    assert s.reserve_ratio == 1.0  # a used all of its max_tokens
    while c in s.waiting:
        run_step(s)
    assert s.num_preemptions == 0


def test_reserve_ratio_follows_early_stops():
    s, _ = make(num_blocks=64, block_size=4)
    for i in range(30):
        q = seq(3, f"r{i}", max_tokens=100, start=10 + 4 * i)
        s.add(q)
        run_step(s, token=2)  # eos at once: 1 of 100 tokens used
    assert s.reserve_ratio < 0.1


def test_reserve_ratio_learns_without_max_tokens():
    s, _ = make(num_blocks=256, block_size=4)
    for i in range(30):
        q = Sequence(f"r{i}", [10 + i, 11, 12], SamplingParams(max_tokens=None, ignore_eos=False), seed=0)
        s.add(q)
        run_step(s, token=2)  # eos at once: 1 token of up to 997
    assert s.reserve_ratio < 0.1
