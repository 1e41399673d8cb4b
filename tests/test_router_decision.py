"""Router v2's choice: SLO misses counted among the requests already there, guardrails (exploration, no
handoff when both paths are saturated), a TTFT SLO that grows with the prompt, a calibration that fades."""
import numpy as np
import pytest

from pdcli.router.calibration import LatencyCalibration
from pdcli.router.decision import EXPLORE_EVERY, Slo, miss_probability
from pdcli.router.load import WorkerLoad
from test_cost_model import load, router


def test_miss_probability_is_half_at_the_limit_and_monotone():
    assert miss_probability(100.0, 100.0) == pytest.approx(0.5)
    assert miss_probability(50.0, 100.0) < 0.01 < 0.99 < miss_probability(200.0, 100.0)
    assert miss_probability(1e9, None) == 0.0


def test_a_long_prompt_goes_where_it_costs_the_others_no_tpot_slo():
    """The collocated worker's 32 sequences decode just under the TPOT SLO: a long prompt prefilled among
    them would push their TPOT over it; on an idle prefill worker it costs them nothing. A short prompt's
    prefill stretches them too little to matter."""
    coll, dec = load(32, 1500), load(32, 1500)
    step = float(router().cm.decode_ms(32, 32 * 1500))
    r = router(slo_tpot_ms=1.15 * step)
    long = r.decide(16000, 256, coll, load(0), dec, "nccl", [coll, dec])
    assert long.path == "disaggregated"
    assert long.scores["collocated"] > long.scores["disaggregated"] + 5  # several of the 32 would miss
    short = r.decide(16, 256, coll, load(0), dec, "nccl", [coll, dec])
    assert abs(short.scores["collocated"] - short.scores["disaggregated"]) < 1.0


def test_each_path_gets_at_least_one_request_in_a_hundred():
    """The issue's guardrail holds in every window a load bin can be (>= 100 requests in a row), wherever it starts."""
    r = router()
    paths = [r.decide(32, 256, load(1), load(0), load(200)).path for _ in range(400)]
    handed = np.cumsum([p == "disaggregated" for p in paths])
    for size in range(100, 401, 7):
        counts = handed[size - 1:] - np.concatenate([[0], handed[:len(paths) - size]])
        assert counts.min() >= 0.01 * size, (size, counts.min())
    assert paths.count("disaggregated") <= 400 // EXPLORE_EVERY + 1  # the cost model's choice otherwise
    assert paths.count("collocated") > 0.9 * len(paths)


def test_no_handoff_when_both_paths_are_saturated():
    r = router()
    flooded = dict(prefill_per_s=50.0, prefill_tokens_per_s=50 * 16000.0)  # far more prefill than a GPU does
    coll, pre, dec = WorkerLoad(decode_batch=4, decode_ctx=4000, **flooded), WorkerLoad(**flooded), load(4)
    assert r.decide(16000, 256, coll, pre, dec).path == "collocated"
    # only the collocated worker saturated: the handoff is the way out
    assert r.decide(16000, 256, coll, WorkerLoad(), dec).path == "disaggregated"


def test_the_ttft_slo_grows_with_the_prompt():
    slo = Slo(ttft_ms=250.0, ttft_per_token_ms=0.1)
    assert slo.ttft_limit(12000) == pytest.approx(1450.0) and slo.ttft_limit(0) == 250.0


def test_calibration_fades_without_traffic():
    from pdcli.router.calibration import CalibrationConfig

    now = [0.0]
    cal = LatencyCalibration(CalibrationConfig(ratio_prior_weight=4.0), clock=lambda: now[0])  # TPOT's prior as TTFT's
    roles = dict(ttft_ms="decode", tpot_ms="decode")
    for i in range(100):
        now[0] = i * 0.1
        cal.observe(roles, dict(ttft_ms=10.0, tpot_ms=10.0), dict(ttft_ms=20.0, tpot_ms=20.0))
    assert cal.factor("decode", "tpot_ms") == pytest.approx(2.0, rel=0.05)
    assert cal.correction("decode", "ttft_ms") == pytest.approx(10.0, rel=0.1)
    now[0] = 10.0 + 20.0  # one half-life later: the observations weigh half, against the prior's weight
    assert 1.5 < cal.factor("decode", "tpot_ms") < 1.95
    now[0] = 10.0 + 100.0
    assert cal.factor("decode", "tpot_ms") < 1.5
    now[0] = 10.0 + 300.0
    assert cal.factor("decode", "tpot_ms") == pytest.approx(1.0, abs=0.01)
    assert abs(cal.correction("decode", "ttft_ms")) < 0.1


def test_starting_a_second_decode_batch_on_the_gpu_counts_against_the_handoff():
    """One GPU, a collocated worker decoding 48 sequences and an idle decode worker beside it (MPS): a request
    handed off would start a second decode batch, and both read all the weights each step; that slows the 48,
    and the router counts it."""
    coll = WorkerLoad(decode_batch=48, decode_ctx=48 * 600, device="cuda:0")
    pre, dec = WorkerLoad(role="prefill", device="cuda:0"), WorkerLoad(role="decode", device="cuda:0")
    r = router()
    d = r.decide(256, 256, coll, pre, dec, "gpu-ipc", [coll, pre, dec])
    assert d.path == "collocated"
    busy_dec = WorkerLoad(role="decode", device="cuda:0", decode_batch=48, decode_ctx=48 * 600, sharing=1)
    coll_shared = WorkerLoad(decode_batch=48, decode_ctx=48 * 600, device="cuda:0", sharing=1)
    again = r.decide(256, 256, coll_shared, pre, busy_dec, "gpu-ipc", [coll_shared, pre, busy_dec])
    extra = d.scores["disaggregated"] - d.scores["collocated"]
    assert extra > again.scores["disaggregated"] - again.scores["collocated"]  # no second batch to start


def test_a_prefill_beside_a_decode_batch_takes_its_time_from_it():
    """One GPU's collocated + prefill workers: a handed-off prompt is prefilled on P and decodes on C. While the
    GPU's sharing is unmeasured a decode step waits for a neighbour's prefill (time-slicing), so P's steps cost
    C's 48 sequences their whole length, more than the prompt's work riding in C's own steps; measured under MPS
    (a decode step 10% slower beside a prefill) the handoff is charged a tenth of that."""
    coll = WorkerLoad(decode_batch=48, decode_ctx=48 * 600, device="cuda:0")
    pre = WorkerLoad(role="prefill", device="cuda:0")
    r = router()  # no SLOs: the least total added latency
    d = r.decide(1024, 256, coll, pre, coll, "gpu-ipc", [coll, pre])
    assert d.path == "collocated"
    r.cm.sharing = dict(decode_beside_prefill=1.1)
    measured = r.decide(1024, 256, coll, pre, coll, "gpu-ipc", [coll, pre])
    gap = lambda x: x.scores["disaggregated"] - x.scores["collocated"]  # noqa: E731
    assert gap(d) > 0 and gap(measured) < gap(d)


def test_a_decode_batch_beside_a_handoffs_prefill_is_charged_what_it_loses_under_the_step_share_law(monkeypatch):
    """Each slows the other by a share of the other's step (a beside a prefill, b beside a decode): a prefill
    step T beside decode steps s lasts T (s + aT) / (s + aT - bs) and the decode batch makes a step per s + aT,
    losing aT / (s + aT - bs) per ms of T (all of it for b = 1); unmeasured, all of it (it waits); b unmeasured, 0."""
    from pdcli.router import decision

    seen = []
    monkeypatch.setattr(decision, "others_cost", lambda cm, landings, slo, out_len: seen.append(landings) or (0.0, 0.0))
    coll = WorkerLoad(decode_batch=48, decode_ctx=48 * 600, device="cuda:0")
    pre = WorkerLoad(role="prefill", device="cuda:0")
    r = router()
    steps = r._prefill_steps_ms(1024, 0, pre)

    def charged(sharing):
        r.cm.sharing = sharing
        seen.clear()
        r.decide(1024, 256, coll, pre, coll, "gpu-ipc", [coll, pre])
        assert len(seen) == 2  # the collocated path's landings, then the handoff's
        beside = [x for x in seen[1] if x.load is coll]
        assert len(beside) == 1 and beside[0].adds_decode
        return beside[0].prefill_ms

    assert charged({}) == pytest.approx(steps)  # unmeasured: the whole prefill
    r.cm.sharing = dict(decode_beside_prefill=2.85, prefill_beside_decode=1.1)
    a, b = r.cm.beside_prefill_share, r.cm.beside_decode_share
    assert 0 < a < 1 and 0 < b < 1
    T = a * r.cm.step_ms(0, 0, [(1024, 0)])
    s = float(r.cm.decode_ms(48, 48 * 600))
    assert charged(r.cm.sharing) == pytest.approx(steps * T / (s + T - b * s))
    assert charged(r.cm.sharing) > steps * T / (s + T)  # more than its share alone: the prefill waits on it too
    r.cm.sharing = dict(decode_beside_prefill=2.85, prefill_beside_decode=9.0)  # b past 1: a step gains one at most
    assert r.cm.beside_decode_share > 1 and charged(r.cm.sharing) == pytest.approx(steps)
    assert charged(dict(decode_beside_prefill=2.85)) == pytest.approx(steps * T / (s + T))


def test_with_slos_met_either_way_the_least_total_added_latency_decides():
    """Both paths meet the SLOs: the tie goes to the path that adds the least latency in all, its own and the
    others'. Handing a prompt to the prefill worker beside a busy collocated worker (unmeasured sharing) gets it
    its first token sooner but stalls the 48 sequences decoding there for the whole prefill."""
    coll = WorkerLoad(decode_batch=48, decode_ctx=48 * 600, device="cuda:0", queued_prefill_tokens=1024)
    pre = WorkerLoad(role="prefill", device="cuda:0")
    r = router(slo_ttft_ms=60_000.0, slo_tpot_ms=60_000.0)
    d = r.decide(1024, 256, coll, pre, coll, "gpu-ipc", [coll, pre])
    own = {k: v["e2e_ms"] for k, v in d.predicted.items()}
    assert d.scores["collocated"] == d.scores["disaggregated"] == pytest.approx(0.0, abs=1e-6)  # no misses
    assert own["disaggregated"] < own["collocated"]  # its own latency alone would hand it off
    assert d.path == "collocated"


def test_the_router_prices_both_directions_of_a_handoff():
    """Two GPUs serving each other: B decodes 60 sequences near the TPOT SLO, A is idle. A long prompt prefilled
    on B would stall all 60; the pair given first (B -> A here) is priced beside the other direction, and the
    handoff goes A -> B (pair_index 1: the first alternative)."""
    from pdcli.router.adaptive import pair_candidates

    a = WorkerLoad(device="cuda:0")
    b = WorkerLoad(decode_batch=60, decode_ctx=60 * 600, device="cuda:1")
    r = router()
    step = float(r.cm.decode_ms(60, 60 * 600))
    r = router(slo_tpot_ms=1.3 * step)
    d = r.decide(12000, 128, b, b, a, "gpu-nccl", [a, b], alternatives=[(a, b, "gpu-nccl", 0)])
    assert d.pair_index == 1 and d.path == "disaggregated"  # staying on B would stall the 60 as well
    only = r.decide(12000, 128, b, b, a, "gpu-nccl", [a, b])  # without the alternative: B -> A or stay on B
    assert only.pair_index == 0 and only.scores["disaggregated"] > d.scores["disaggregated"]
    assert d.predicted_raw["disaggregated"]["ttft_ms"] < only.predicted_raw["disaggregated"]["ttft_ms"]
    # a short prefill stalls nobody for long: only the given pair is priced (balance decides)
    assert r.decide(256, 128, b, b, a, "gpu-nccl", [a, b], alternatives=[(a, b, "gpu-nccl", 0)]).pair_index == 0
    # requests on their way to a decode worker count in the batch a request routed there now will meet
    from pdcli.router import latency

    busy = WorkerLoad(decode_batch=8, decode_ctx=8 * 600, incoming_decodes=40)
    assert latency.tpot_ms(r.cm, busy, 1000, 128) > latency.tpot_ms(r.cm, load(8, 600), 1000, 128)
    # which pairs are priced: among the 2 least loaded that can prefill and the 2 that can decode, least first
    w = {k: WorkerLoad(decode_batch=k) for k in range(4)}
    pairs = [(w[i], w[j]) for i in range(4) for j in range(4) if i != j]
    picked = pair_candidates(pairs, lambda x: x.decode_batch, lambda x: x.decode_batch)
    assert [(p.decode_batch, q.decode_batch) for p, q in picked] == [(0, 1), (1, 0)]
    # each role by its own load: prefill where the queue is short, decode where the batch is small
    picked = pair_candidates(pairs, lambda x: -x.decode_batch, lambda x: x.decode_batch)
    assert [(p.decode_batch, q.decode_batch) for p, q in picked] == [(3, 0), (3, 1), (2, 0), (2, 1)]


def test_the_coordinators_view_counts_decodes_on_their_way():
    """A request being prefilled on one worker for another counts there as an incoming decode: routing on the
    decode batch alone sent many to one worker before the first of them arrived (in the simulator on 8 GPUs,
    decode batches of 10 to 190 side by side)."""
    from pdcli import SamplingParams
    from pdcli.coordinator.tracked import Stage, Tracked
    from pdcli.coordinator.worker_pool import WorkerHandle
    from pdcli.router.load import LoadView, committed_batch
    from pdcli.workers.layout import WorkerSpec

    workers = [WorkerHandle(WorkerSpec(r, "collocated", f"cuda:{r}"), None, None) for r in range(2)]
    t = Tracked("a", 0, [1] * 100, SamplingParams(), 0, "disaggregated", 0.0, prefill_rank=0, decode_rank=1,
                stage=Stage.PREFILL)
    loads = LoadView().snapshot(workers, [t])
    assert loads[1].incoming_decodes == 1 and committed_batch(loads[1]) == 1 and loads[0].queued_prefill_tokens == 100
    assert loads[0].incoming_decodes == 0


def test_the_coordinators_view_counts_what_a_chunked_prompt_has_left():
    """A prompt its worker reports partly prefilled (StepTokens.prefilled) counts only the tokens it has left, and
    the attention pairs they bring (n^2 - done^2 of the squared lengths); the simulator's view does the same."""
    from pdcli import SamplingParams
    from pdcli.coordinator.tracked import Stage, Tracked
    from pdcli.coordinator.worker_pool import WorkerHandle
    from pdcli.plan.sim import SimSeq
    from pdcli.router.load import LoadView
    from pdcli.workers.layout import WorkerSpec

    workers = [WorkerHandle(WorkerSpec(0, "collocated", "cuda:0"), None, None)]
    t = Tracked("a", 0, [1] * 10000, SamplingParams(), 0, "collocated", 0.0, prefill_rank=0, stage=Stage.COLLOCATED)
    assert LoadView().snapshot(workers, [t])[0].queued_prefill_tokens == 10000
    t.prefilled = 8192
    w = LoadView().snapshot(workers, [t])[0]
    assert w.queued_prefill_tokens == 1808 and w.queued_prefill_sq_tokens == 10000 ** 2 - 8192 ** 2
    assert w.queued_since_step_tokens == 0  # no step seen yet: it began one when it came to the idle worker
    assert w.since_step_ms is not None
    from pdcli.plan.simulator import SimSpec, Simulator
    from test_cost_model import cost_model

    sim = Simulator(cost_model(), [SimSpec(0, "collocated", "n:cuda:0")], "collocated")
    seq = SimSeq(0, 0.0, 10000, 10)
    seq.prefilled = seq.reported = 8192  # computed, and reported with a step that sampled
    sim.workers[0].hold(seq)
    v = sim.loads()[0]
    assert v.queued_prefill_tokens == 1808 and v.queued_prefill_sq_tokens == 10000 ** 2 - 8192 ** 2


def test_the_running_step_began_at_the_last_end_or_when_an_idle_worker_got_a_prompt():
    from pdcli.router.load import WorkerLoad, mark_step, running_step_start

    assert running_step_start(1.0, [0.9, 1.2], False) == 1.0  # it held a prompt then: the next step began at once
    assert running_step_start(1.0, [1.3, 1.2], False) == 1.2  # idle then: the first prompt to come began one
    assert running_step_start(1.0, [1.2], True) == 1.0  # decoding: steps run back to back
    assert running_step_start(None, [], False) is None
    w = WorkerLoad(queued_prefill_tokens=300)
    mark_step(w, 1.0, [(1.2, 100), (1.25, 200)], 1.3)
    assert w.since_step_ms == pytest.approx(100.0) and w.queued_since_step_tokens == 200


def test_a_prompt_s_load_and_forecast_count_only_what_its_worker_has_not_cached():
    """The coordinator's prefix index says how much of a prompt its worker holds: the prompt's queued work (its
    tokens left) and the load forecast (the GPU's prefill share) count only the rest, as the worker computes
    it (a shared-prefix run at 25 req/s, 2k of 2.3k tokens cached, was priced at a prefill share of 1.03, so
    both paths counted as saturated and no request was handed off). The simulator counts the same
    (tests/test_plan.py)."""
    from types import SimpleNamespace

    from pdcli.coordinator.routing import Routing
    from pdcli.coordinator.tracked import Tracked
    from pdcli.sampling_params import SamplingParams
    from pdcli.workers.layout import WorkerSpec

    w = SimpleNamespace(spec=WorkerSpec(0, "collocated", "cpu"), info=SimpleNamespace(num_blocks=1024),
                        inflight=set(), alive=True, leaving=False, last_step_end=None)
    pool = SimpleNamespace(workers=[w], serving=lambda role=None: [x for x in [w] if role in (None, x.spec.role)],
                           can_transfer=lambda p, d: False)
    routing = Routing(pool, "collocated", block_size=16)
    system = list(range(100, 100 + 2048))

    def routed(tail: int) -> Tracked:
        t = Tracked(f"r{tail}", 0, system + [tail] * 256, SamplingParams(max_tokens=8), 0, "", 0.0)
        assert routing.route(t, None, lambda: []) is not None
        t.path, t.prefill_rank, t.stage = "collocated", 0, "collocated"
        return t

    first = routed(1)
    assert first.prefilled == 0  # nothing cached yet: the whole prompt
    second = routed(2)
    assert second.prefilled == 2048  # the system prompt's 128 blocks are there
    loads = routing.loads.snapshot([w], [second])
    assert loads[0].queued_prefill_tokens == 256
    rate = routing.loads.forecast.prefill[0]  # the first prompt opens its window; the second is counted
    assert rate.level == pytest.approx(256, rel=1e-3)  # the tokens its worker computes, not its 2304
    # decoding there, the second's hit (blocks shared with the first) counts at SHARED_CONTEXT_READ in its steps
    from pdcli.router.cost_model import SHARED_CONTEXT_READ
    from pdcli.router.load import shared_discount

    first.tokens, second.tokens = {0: [7, 7, 7]}, {0: [7, 7, 7]}  # 3 tokens each
    both = routing.loads.snapshot([w], [first, second])[0]
    assert second.cached_tokens == 2048 and first.cached_tokens == 0
    assert both.decode_batch == 2 and both.decode_shared_ctx == shared_discount(2048, SHARED_CONTEXT_READ) == 1024
    assert both.decode_ctx == 2 * (2048 + 256 + 3) - 1024
