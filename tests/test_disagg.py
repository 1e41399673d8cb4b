"""P/D disaggregation on CPU: worker processes over gloo, outputs equal to the collocated path and HF."""
import os
import signal
import time

import pytest

from pdcli import SamplingParams
from pdcli.coordinator.central import CentralScheduler
from pdcli.coordinator.policy import RouteInput, Threshold, make_policy
from pdcli.workers.layout import parse_layout
from tiny_models import hf_greedy

ENGINE = dict(max_num_batched_tokens=16, block_size=8, num_kv_blocks=96,
              async_scheduling=True)  # as on GPUs (on the CPU it is off by default)
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def wait_pools_full(cs, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        stats = cs.worker_stats()
        if all(s["num_free_blocks"] == s["num_blocks"] and s["handoff"] == 0 for s in stats) or \
                time.monotonic() > deadline:
            return stats


@pytest.fixture(scope="module")
def model_path(tiny_model_dir):
    return tiny_model_dir("llama-gqa")


@pytest.fixture(scope="module")
def reference(model_path, prompts):
    return hf_greedy(model_path, prompts, 16)


def test_disaggregated_equals_collocated_and_hf(model_path, prompts, reference):
    with CentralScheduler(model_path, parse_layout("cpu", "cpu", "cpu"), **ENGINE) as cs:
        coll = cs.generate(prompts, GREEDY, mode="collocated", timeout=120)
        disagg = cs.generate(prompts, GREEDY, mode="disaggregated", timeout=120)
        assert [o.error for o in disagg] == [None] * len(prompts)
        assert [o.metrics["path"] for o in disagg] == ["disaggregated"] * len(prompts)
        assert [o.token_ids for o in coll] == [o.token_ids for o in disagg] == reference
        assert all(o.metrics["transfer_bytes"] > 0 for o in disagg)
        assert cs.accounting["disaggregated"]["requests"] == len(prompts)
        stats = wait_pools_full(cs)
        assert all(s["num_free_blocks"] == s["num_blocks"] for s in stats), stats


def test_a_prefill_worker_hands_back_to_the_collocated_worker_beside_it(model_path, prompts, reference):
    """One device's adaptive layout: a collocated and a prefill worker, no decode worker; a handed-off request
    is prefilled on P and decoded on C, with C's own tokens; every block back in both pools."""
    from pdcli.workers.layout import pd_on_collocated

    layout = parse_layout("cpu", "cpu")
    assert [s.role for s in layout] == ["collocated", "prefill"] and pd_on_collocated(layout, "adaptive")
    with CentralScheduler(model_path, layout, pd_on_collocated=True, **ENGINE) as cs:
        disagg = cs.generate(prompts, GREEDY, mode="disaggregated", timeout=120)
        assert [o.error for o in disagg] == [None] * len(prompts)
        assert [o.metrics["path"] for o in disagg] == ["disaggregated"] * len(prompts)
        assert [o.token_ids for o in disagg] == reference
        # KV moved for every one, and the only worker that decodes here is the collocated one
        assert all(o.metrics["transfer_bytes"] > 0 for o in disagg)
        assert cs.accounting["disaggregated"]["requests"] == len(prompts)
        stats = wait_pools_full(cs)
        assert all(s["num_free_blocks"] == s["num_blocks"] for s in stats), stats
    with pytest.raises(ValueError, match="--prefill worker on the device of a --collocated one"):
        parse_layout("", "cpu")


def wait_transfer_kinds(cs, tracked, timeout=20.0):
    """The prefill worker reports its send after the decode worker may already have finished."""
    for t in tracked:
        cs.wait_transfer(t, timeout)
    return [t.transfer_kind for t in tracked]


def test_layerwise_and_whole_sends_give_the_same_tokens(model_path, prompts, reference):
    """KV sent layer by layer during the last prefill chunk (the decode worker reserved blocks at once)
    or all layers after it: the same greedy tokens, and every block back in every pool."""
    with CentralScheduler(model_path, parse_layout("", "cpu", "cpu"), **ENGINE) as cs:
        for layerwise in (True, False):
            cs.kv_layerwise = layerwise
            tracked = [cs.submit(p, GREEDY, mode="disaggregated") for p in prompts * 2]
            for t in tracked:
                assert t.done.wait(120)
            assert [cs.output(t).token_ids for t in tracked] == reference * 2
            kinds = wait_transfer_kinds(cs, tracked)
            if layerwise:
                assert "layers" in kinds and set(kinds) <= {"layers", "whole"}, kinds
            else:
                assert set(kinds) == {"whole"}, kinds
        stats = wait_pools_full(cs)
        assert all(s["num_free_blocks"] == s["num_blocks"] and s["handoff"] == 0 for s in stats), stats


@pytest.mark.parametrize("layout,hybrid", [(("", "cpu", "cpu"), False), (("cpu,cpu",), True)])
def test_aborts_and_one_token_requests_return_every_block(model_path, prompts, layout, hybrid):
    """The decode worker reserves at submission: requests aborted at any stage, and requests that end on
    the prefill worker's first token, still free its blocks (and the prefill worker's); also with two
    collocated workers serving each other (async scheduling on the prefill side)."""
    with CentralScheduler(model_path, parse_layout(*layout), pd_on_collocated=hybrid, **ENGINE) as cs:
        one = SamplingParams(temperature=0, max_tokens=1)
        many = [cs.submit(p, GREEDY if i % 3 else one, mode="disaggregated") for i, p in enumerate(prompts * 4)]
        for i, t in enumerate(many):
            if i % 2:
                time.sleep(0.01 * i)
                cs.abort(t.rid)
        for t in many:
            assert t.done.wait(120)
        assert all(len(cs.output(t).token_ids) == 1 for i, t in enumerate(many) if i % 3 == 0 and i % 2 == 0)
        stats = wait_pools_full(cs)
        assert all(s["num_free_blocks"] == s["num_blocks"] and s["handoff"] == 0 for s in stats), stats


def test_collocated_workers_prefill_and_decode_for_each_other(model_path, prompts, reference):
    """pd_on_collocated: two collocated workers and no P/D workers; the disaggregated path prefills on one
    and decodes on the other (either way round), with the collocated path's tokens, and every block returns."""
    with CentralScheduler(model_path, parse_layout("cpu,cpu"), pd_on_collocated=True, **ENGINE) as cs:
        coll = cs.generate(prompts, GREEDY, mode="collocated", timeout=120)
        tracked = [cs.submit(p, GREEDY, mode="disaggregated") for p in prompts * 2]
        for t in tracked:
            assert t.done.wait(120)
        assert [o.token_ids for o in coll] == reference
        assert [cs.output(t).token_ids for t in tracked] == reference * 2
        assert {t.path for t in tracked} == {"disaggregated"}
        assert {(t.prefill_rank, t.decode_rank) for t in tracked} == {(0, 1), (1, 0)}
        assert all(t.transfer_bytes > 0 for t in tracked)
        stats = wait_pools_full(cs)
        assert all(s["num_free_blocks"] == s["num_blocks"] and s["handoff"] == 0 for s in stats), stats


def test_two_prefill_workers_one_decode(model_path, prompts, reference):
    with CentralScheduler(model_path, parse_layout("cpu", "cpu,cpu", "cpu"), **ENGINE) as cs:
        tracked = [cs.submit(p, GREEDY, mode="disaggregated") for p in prompts]
        for t in tracked:
            assert t.done.wait(120)
        assert [cs.output(t).token_ids for t in tracked] == reference
        assert {t.prefill_rank for t in tracked} == {1, 2}  # both prefill workers served
        assert {t.decode_rank for t in tracked} == {3}
        stats = wait_pools_full(cs)
        assert all(s["num_free_blocks"] == s["num_blocks"] for s in stats), stats


def test_decode_worker_death_fails_its_requests_then_collocated(model_path, prompts):
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    with CentralScheduler(model_path, parse_layout("cpu", "cpu", "cpu"), **ENGINE) as cs:
        tracked = [cs.submit(p, long, mode="disaggregated") for p in prompts[:3]]
        deadline = time.monotonic() + 60
        while not any(t.stage == "decode" for t in tracked) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert any(t.stage == "decode" for t in tracked)
        decode = next(w for w in cs.workers if w.spec.role == "decode")
        os.kill(decode.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        for t in tracked:
            assert t.done.wait(10), "a request of the dead worker hung"
        assert time.monotonic() - killed < 10
        outs = [cs.output(t) for t in tracked]
        assert all(o.error and "died" in o.error for o in outs), [o.error for o in outs]
        later = cs.generate(prompts[3:], GREEDY, mode="disaggregated", timeout=60)
        assert [o.metrics["path"] for o in later] == ["collocated"] * len(later)
        assert all(o.error is None and len(o.token_ids) == 16 for o in later)
        stats = wait_pools_full(cs)
        assert [s["role"] for s in stats] == ["collocated", "prefill"]
        assert all(s["num_free_blocks"] == s["num_blocks"] for s in stats), stats


def test_shutdown_leaves_no_worker_processes(model_path, prompts):
    cs = CentralScheduler(model_path, parse_layout("", "cpu", "cpu"), **ENGINE)
    pending = cs.submit(prompts[0], SamplingParams(temperature=0, max_tokens=500, ignore_eos=True), "disaggregated")
    procs = [w.proc for w in cs.workers]
    cs.shutdown()
    assert all(not p.is_alive() for p in procs)
    assert pending.done.is_set() and cs.output(pending).error


@pytest.mark.parametrize("args, match", [
    (("", "", ""), "no workers"), (("", "cpu", ""), "at least one --prefill and one --decode"),
    (("gpu0", "", ""), "bad device"),
])
def test_layout_errors(args, match):
    with pytest.raises(ValueError, match=match):
        parse_layout(*args)


def test_layout_ranks_in_role_order():
    specs = parse_layout("cuda:0", "cuda:1,cuda:3", "cuda:2")
    assert [(s.rank, s.role, s.device) for s in specs] == [
        (0, "collocated", "cuda:0"), (1, "prefill", "cuda:1"), (2, "prefill", "cuda:3"), (3, "decode", "cuda:2")]


def test_threshold_policy_is_dynamos_rule():
    t = Threshold()
    assert t.choose(RouteInput(1001, None, prefill_queue=0, collocated_load=0)) == "disaggregated"
    assert t.choose(RouteInput(1000, None, prefill_queue=0, collocated_load=0)) == "collocated"
    assert t.choose(RouteInput(5000, None, prefill_queue=2, collocated_load=0)) == "collocated"
    with pytest.raises(ValueError, match="unknown mode"):
        make_policy("fastest")


def test_generate_cli_mode_disaggregated_json(model_path, prompts, reference):
    import json

    from typer.testing import CliRunner

    from pdcli.cli import app

    r = CliRunner().invoke(app, ["generate", "Hello world", "How are you", "--model", model_path, "--mode",
                                 "disaggregated", "--collocated", "cpu", "--prefill", "cpu", "--decode", "cpu",
                                 "--max-tokens", "6", "--ignore-eos", "--no-chat", "--json", "--block-size", "8"])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert [d["path"] for d in data] == ["disaggregated", "disaggregated"]
    assert all(len(d["token_ids"]) == 6 for d in data)
    # collocated workers only, on two devices: they prefill and decode for each other
    r = CliRunner().invoke(app, ["generate", "Hello world", "How are you", "--model", model_path, "--mode",
                                 "disaggregated", "--collocated", "cpu,cpu", "--max-tokens", "6", "--ignore-eos",
                                 "--no-chat", "--json", "--block-size", "8"])
    assert r.exit_code == 0, r.stderr
    pd = json.loads(r.stdout)
    assert [d["path"] for d in pd] == ["disaggregated", "disaggregated"]
    assert [d["token_ids"] for d in pd] == [d["token_ids"] for d in data]


def test_adaptive_mode_uses_the_fitted_cost_model(model_path, prompts, reference, tmp_path):
    from pdcli.router.fit import fit_profile, write_params
    from test_cost_model import synthetic_profile

    write_params(str(tmp_path), fit_profile(dict(synthetic_profile(), model=model_path)))
    with CentralScheduler(model_path, parse_layout("cpu", "cpu", "cpu"), mode="adaptive", params_dir=str(tmp_path),
                          **ENGINE) as cs:
        outs = cs.generate(prompts, GREEDY, timeout=120)
        assert [o.token_ids for o in outs] == reference
        for o in outs:
            d = o.metrics["decision"]
            assert d["decided_by"] == "cost-model" and d["path"] == o.metrics["path"]
            assert set(d["predicted"]) == {"collocated", "disaggregated"}
        assert sum(nig.n for nig in cs.router.predictor.buckets.values()) == len(prompts)


def test_adaptive_without_params_says_it_fell_back(model_path, prompts):
    with CentralScheduler(model_path, parse_layout("cpu", "cpu", "cpu"), mode="adaptive", **ENGINE) as cs:
        out = cs.generate(prompts[:1], GREEDY, timeout=60)[0]
        assert out.metrics["decision"]["decided_by"] == "threshold-fallback"


def test_burst_of_long_prompts_does_not_wedge_the_pipes(model_path):
    """More prompt bytes than a pipe buffers, all at once: sends are queued, so nobody blocks on a full pipe."""
    import random

    rng = random.Random(3)
    prompts = [[rng.randrange(3, 400) for _ in range(700)] for _ in range(60)]
    p = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    with CentralScheduler(model_path, parse_layout("cpu", "cpu", "cpu"), block_size=16, num_kv_blocks=3000,
                          max_num_batched_tokens=2048) as cs:
        outs = cs.generate(prompts, p, mode="threshold", timeout=180)
        assert all(o.error is None and len(o.token_ids) == 3 for o in outs), [o.error for o in outs if o.error][:3]
        stats = wait_pools_full(cs)
        assert all(s["num_free_blocks"] == s["num_blocks"] for s in stats), stats


class FakeConn:
    def __init__(self, msgs):
        self.msgs, self.timeouts = list(msgs), []

    def poll(self, timeout):
        self.timeouts.append(timeout)
        return bool(self.msgs)

    def recv(self):
        return self.msgs.pop(0)


def test_idle_worker_steps_as_soon_as_a_message_has_come():
    """An idle worker waits for the first message only: the ones that follow it within the idle poll must
    not hold back the step (they kept a prefill worker's requests waiting ~100 ms at 50 req/s)."""
    from pdcli.messages import SendKV, Shutdown, Submit
    from pdcli.workers.worker import IDLE_POLL_S, Worker

    w = Worker.__new__(Worker)
    handled = []
    w.handle = lambda msg: handled.append(msg) or not isinstance(msg, Shutdown)
    a, b, c, d = (Submit(r, [1], GREEDY, 0) for r in "abcd")
    dest = SendKV("a", 1, 1, None, True)
    w.conn = FakeConn([a, dest, b])
    assert w.drain_messages(IDLE_POLL_S)
    assert handled == [a, dest, b]
    assert w.conn.timeouts == [IDLE_POLL_S, 0.0, 0.0, 0.0]
    w.conn = FakeConn([c, Shutdown(), d])
    assert not w.drain_messages(0.0)
    assert handled[-1] == Shutdown() and w.conn.msgs == [d]
