"""Cost model, fitter, output-length predictor and adaptive router on synthetic data (CPU)."""
import json
import math

import numpy as np
import pytest
import torch

from pdcli.router.adaptive import AdaptiveRouter
from pdcli.router.load import WorkerLoad
from pdcli.router.cost_model import CostModel, decode_features, mixed_form, prefill_form, prefill_marginal_features
from pdcli.router.fitters import fit_prefill
from pdcli.router.fit import SCHEMA_VERSION, ProfileError, fit_profile, load_cost_model, load_profile, write_params
from pdcli.router.predictor import NIG, OutputLengthPredictor
from pdcli.plan.sim import SimStep

# prefill: p0 (floor), a0, a1, a2 (prefix attention), a3 (self attention); mixed: m0, kd, kp, mf (chunk's floor)
TRUE = dict(prefill=[3.0, 2.0, 0.05, 4e-6, 7e-6], decode=[6.0, 0.02, 3e-5], mixed=[5.0, 1.5, 0.9, 6.0], t0=0.3,
            gbs=20.0)


def synthetic_profile(noise=0.02, seed=0) -> dict:
    """A profile written point by point from the cost model's documented roofline forms (the docstring of
    pdcli/router/cost_model.py) with TRUE's parameters, not through the code's feature functions: a bug in
    those makes the fit miss TRUE."""
    p0, a0, a1, a2, a3 = TRUE["prefill"]
    d0, d1, d2 = TRUE["decode"]
    m0, kd, kp, mf = TRUE["mixed"]

    def prefill(n, c):  # n new tokens after c cached ones
        return max(p0, a0 + a1 * n + a2 * n * c + a3 * n * n / 2)

    def decode(b, s):  # b sequences holding s context tokens in all
        return d0 + d1 * b + d2 * s

    def mixed(b, s, n, c):  # own overhead + scaled decode marginal cost + the chunk's, at least mf
        return m0 + kd * (d1 * b + d2 * s) + max(mf, kp * (a1 * n + a2 * n * c + a3 * n * n / 2))

    def transfer(nbytes):
        return TRUE["t0"] + nbytes / (TRUE["gbs"] * 1e6)

    rng = np.random.default_rng(seed)
    jitter = lambda y: np.array(y) * (1 + noise * rng.standard_normal(len(y)))  # noqa: E731
    n = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192] * 3
    c = [0] * 10 + [1024] * 10 + [4096] * 10
    b = [1, 8, 32, 64, 128, 256] * 4
    s = [bi * si for bi, si in zip(b, [128] * 6 + [512] * 6 + [2048] * 6 + [8192] * 6)]
    mb = [8, 64, 256] * 8  # mixed steps: decode batch x context per sequence x prefill chunk
    ms = [bi * si for bi, si in zip(mb, ([1024] * 3 + [4096] * 3) * 4)]
    mn, mc = [32] * 6 + [256] * 6 + [1024] * 6 + [2048] * 6, [0] * 24  # 32 tokens: the floor mf
    tb = [mib * 2**20 for mib in (1, 4, 16, 64, 256) for _ in range(3)]
    return dict(schema_version=SCHEMA_VERSION, model="dummy:test", device="cpu", max_num_batched_tokens=8192,
                kv_bytes_per_token=4096, provenance=dict(date="today"),
                prefill=dict(n=n, c=c, ms=jitter([prefill(*p) for p in zip(n, c)]).tolist()),
                decode=dict(batch=b, ctx=s, ms=jitter([decode(*p) for p in zip(b, s)]).tolist()),
                mixed=dict(batch=mb, ctx=ms, n=mn, c=mc, ms=jitter([mixed(*p) for p in zip(mb, ms, mn, mc)]).tolist()),
                transfer=dict(cpu=dict(tokens=[t // 4096 for t in tb], bytes=tb,
                                       ms=warm_up(jitter([transfer(t) for t in tb])).tolist())))


def warm_up(ms):
    """The first transfer of a profile is slow (setup), as measured on the H100: 20x the others."""
    ms = np.array(ms)
    ms[0] *= 20
    return ms


def test_fitter_recovers_known_parameters():
    # the code's forms give the closed forms' values (the profile above does not go through them)
    exact = synthetic_profile(noise=0.0)
    pre, dec, mix = exact["prefill"], exact["decode"], exact["mixed"]
    assert prefill_marginal_features([3], [5]).tolist() == [[3, 15, 4.5]]  # [n, n c, n^2 / 2]
    assert prefill_form(TRUE["prefill"], pre["n"], pre["c"]) == pytest.approx(pre["ms"], rel=1e-12)
    assert decode_features(dec["batch"], dec["ctx"]) @ TRUE["decode"] == pytest.approx(dec["ms"], rel=1e-12)
    d1, d2 = TRUE["decode"][1:]
    dec = d1 * np.array(mix["batch"]) + d2 * np.array(mix["ctx"])
    pre = prefill_marginal_features(mix["n"], mix["c"]) @ np.array(TRUE["prefill"][2:])
    assert mixed_form(TRUE["mixed"], dec, pre) == pytest.approx(mix["ms"], rel=1e-12)
    # served (the router, the planner): the decode step plus the chunk's work beyond its fixed cost, kd at 1
    cm = CostModel(TRUE["prefill"], TRUE["decode"], TRUE["mixed"], {}, 8192, 4096)
    m0, _, kp, mf = TRUE["mixed"]
    decode_step = cm.decode_ms(np.array(mix["batch"]), np.array(mix["ctx"]))
    served = decode_step + np.maximum(0, m0 + np.maximum(mf, kp * pre) - TRUE["decode"][0])
    assert cm.mixed_ms(mix["batch"], mix["ctx"], mix["n"], mix["c"]) == pytest.approx(served, rel=1e-12)
    assert cm.step_ms(8, 8 * 1024, [(1024, 0)]) == pytest.approx(float(cm.mixed_ms(8, 8 * 1024, 1024)), rel=1e-12)
    # and the fit of a noisy profile recovers the parameters
    params = fit_profile(synthetic_profile())
    assert params["prefill"]["params"] == pytest.approx(TRUE["prefill"], rel=0.1)
    assert params["decode"]["params"] == pytest.approx(TRUE["decode"], rel=0.1)
    assert params["interference"]["params"] == pytest.approx(TRUE["mixed"], rel=0.1)
    assert params["transfer"]["cpu"]["gb_s"] == pytest.approx(TRUE["gbs"], rel=0.1)
    for comp in ("prefill", "decode", "interference"):
        assert params[comp]["r2"] > 0.98 and params[comp]["max_rel_err"] < 0.1


def test_files_round_trip_and_errors(tmp_path):
    folder = str(tmp_path)
    with pytest.raises(ProfileError, match="pdcli profile"):
        load_profile(folder)
    torch.save(synthetic_profile(), tmp_path / "profile_data.pt")
    data = load_profile(folder)  # plain dicts: weights_only loading works
    path = write_params(folder, fit_profile(data))
    cm = load_cost_model(folder, model="dummy:test")
    assert cm.prefill == pytest.approx(json.load(open(path))["prefill"]["params"])
    with pytest.raises(ProfileError, match="pdcli profile --model other"):
        load_cost_model(folder, model="other")
    (tmp_path / "params.json").write_text("{not json")
    with pytest.raises(ProfileError, match="pdcli fit"):
        load_cost_model(folder)
    stale = dict(fit_profile(data), schema_version=0)
    (tmp_path / "params.json").write_text(json.dumps(stale))
    with pytest.raises(ProfileError, match="stale schema_version.*pdcli fit"):
        load_cost_model(folder)
    (tmp_path / "profile_data.pt").write_bytes(b"garbage")
    with pytest.raises(ProfileError, match="unreadable.*pdcli profile"):
        load_profile(folder)
    torch.save(dict(synthetic_profile(), schema_version=99), tmp_path / "profile_data.pt")
    with pytest.raises(ProfileError, match="schema_version 99"):
        load_profile(folder)


def lines_run(fn, *args) -> int:
    """Python lines executed by fn(*args), in it and in everything it calls: an operation count, not a timing."""
    import sys

    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        count += event == "line"
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        fn(*args)
    finally:
        sys.settrace(previous)
    return count


def test_predictor_posterior_converges_and_update_is_constant_time():
    rng = np.random.default_rng(1)
    pred = OutputLengthPredictor()
    true_median, sigma = 300.0, 0.4
    for x in np.exp(rng.normal(math.log(true_median), sigma, 3000)):
        pred.observe(500, int(round(x)))
    assert pred.mean(500) == pytest.approx(true_median, rel=0.05)
    q10, q90 = pred.quantile(500, 0.1), pred.quantile(500, 0.9)
    assert q10 == pytest.approx(true_median * math.exp(-1.2816 * sigma), rel=0.1)
    assert q90 == pytest.approx(true_median * math.exp(1.2816 * sigma), rel=0.1)
    assert pred.mean(500, max_tokens=100) == 100  # capped by the request's max_tokens
    assert pred.mean(20) == pytest.approx(128, rel=0.01)  # other buckets keep the prior
    # O(1): an update does the same operations on the same few numbers whatever the history length
    nig = NIG(0.0, 1.0, 2.0, 1.0)
    first = lines_run(nig.update, 1.0)
    for x in rng.normal(0.0, 1.0, 5000):
        nig.update(float(x))
    assert lines_run(nig.update, 1.0) == first  # no loop over past observations
    assert set(vars(nig)) == {"mu", "kappa", "alpha", "beta", "n"}
    assert all(isinstance(v, (int, float)) for v in vars(nig).values())  # no history kept
    twin = NIG(**vars(nig))  # the same state without the 5001 updates behind it
    nig.update(0.7)
    twin.update(0.7)
    assert vars(twin) == vars(nig)  # the update reads the state alone
    fresh = OutputLengthPredictor()
    fresh.observe(500, 300)
    assert lines_run(pred.observe, 500, 300) == lines_run(fresh.observe, 500, 300)  # 3000 observations vs 1


def cost_model() -> CostModel:
    # H100-like magnitudes: additive interference (k = 1), 200 GB/s transfer, 128 KiB of KV per token
    # additive interference: a mixed step costs one step overhead plus both marginal costs
    return CostModel(prefill=TRUE["prefill"], decode=TRUE["decode"], interference=[TRUE["decode"][0], 1.0, 1.0],
                     transfer={"nccl": (0.3, 200.0)}, max_num_batched_tokens=2048, kv_bytes_per_token=131072)


def router(**slo) -> AdaptiveRouter:
    r = AdaptiveRouter(cost_model(), **slo)
    for _ in range(50):  # every prompt-length bucket has learnt ~200 output tokens
        for L in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768):
            r.observe(L, 200)
    return r


def load(batch, ctx_per_seq=1500, queued=0):
    return WorkerLoad(queued_prefill_tokens=queued, decode_batch=batch, decode_ctx=batch * ctx_per_seq)


def best(decision):
    return min(decision.predicted, key=lambda k: decision.predicted[k]["e2e_ms"])


def test_longer_prompts_move_to_disaggregated():
    """Without SLOs the router minimises the latency a request adds in all: its own, and what its prefill
    work adds to the sequences decoding where it is prefilled (each waits for it once) and its decode slot to
    the batch it joins. A short prompt costs the collocated worker's 64 sequences little, and a slot in the
    decode worker's bigger batch more: it stays; a long one would stall all 64 for its whole prefill: it goes
    to the idle prefill worker, although its own end-to-end latency is about the same either way."""
    r = router()
    short = r.decide(32, 256, load(64), load(0), load(96))
    long = r.decide(16000, 256, load(64), load(0), load(96))
    assert (short.path, long.path) == ("collocated", "disaggregated")
    assert short.path == best(short)
    own = {k: v["e2e_ms"] for k, v in long.predicted.items()}
    assert own["collocated"] > 0.5 * own["disaggregated"]  # not its own latency alone
    assert long.scores["collocated"] - own["collocated"] > 10 * (long.scores["disaggregated"] - own["disaggregated"])
    assert short.output_len == pytest.approx(200, rel=0.05)


def test_prefill_queue_moves_to_collocated():
    """A collocated worker decoding one sequence: its prefill would stall it once; an idle prefill worker is
    still better, one with 20k tokens queued is not."""
    r = router()
    idle = r.decide(16000, 256, load(1), load(0), load(64))
    queued = r.decide(16000, 256, load(1), load(0, queued=20000), load(64))
    assert (idle.path, queued.path) == ("disaggregated", "collocated")
    assert queued.predicted["disaggregated"]["ttft_ms"] > idle.predicted["disaggregated"]["ttft_ms"]


def test_collocated_load_moves_to_disaggregated():
    r = router()
    light = r.decide(2000, 256, load(1, 500), load(0), load(64))
    heavy = r.decide(2000, 256, load(64, queued=30000), load(0), load(64))
    assert (light.path, heavy.path) == ("collocated", "disaggregated")


def test_busy_collocated_workers_as_prefill_and_decode_cost_more():
    """pd_on_collocated: a prefill worker with its own decode batch prefills slower, and a decode worker that
    prompts are routed to decodes slower, than dedicated idle ones."""
    r = router()
    dedicated = r.predict(2000, 200, None, load(0), load(32))["disaggregated"]
    busy_dec = WorkerLoad(decode_batch=32, decode_ctx=32 * 1500, prefill_per_s=8.0, prefill_tokens_per_s=16000.0)
    busy = r.predict(2000, 200, None, load(64), busy_dec)["disaggregated"]
    assert busy["ttft_ms"] > dedicated["ttft_ms"] and busy["tpot_ms"] > dedicated["tpot_ms"]


def test_slos_pick_the_path_that_meets_them():
    # collocated (one sequence decoding) has the lower end-to-end latency, but queued prompts ahead of it delay
    # its first token
    coll, dec = load(1, 1000, queued=2048), load(60, 2000)
    free = router().decide(1000, 64, coll, load(0), dec)
    p = free.predicted
    assert free.path == "collocated" == best(free)
    assert p["collocated"]["ttft_ms"] > p["disaggregated"]["ttft_ms"]
    ttft_slo = (p["collocated"]["ttft_ms"] + p["disaggregated"]["ttft_ms"]) / 2
    assert router(slo_ttft_ms=ttft_slo).decide(1000, 64, coll, load(0), dec).path == "disaggregated"
    # a TPOT SLO only collocated meets keeps it there even under the TTFT SLO's pressure
    tpot_slo = (p["collocated"]["tpot_ms"] + p["disaggregated"]["tpot_ms"]) / 2
    assert router(slo_tpot_ms=tpot_slo).decide(1000, 64, coll, load(0), dec).path == "collocated"
    # when no path meets the SLOs, the lower end-to-end latency wins
    assert router(slo_tpot_ms=1e-3, slo_ttft_ms=1e-3).decide(1000, 64, coll, load(0), dec).path == "collocated"


def test_profile_and_fit_commands_on_cpu(tmp_path):
    """`pdcli profile` measures a tiny model on this CPU (steps and the gloo transfer path) and `pdcli fit`
    turns it into params.json and a plot."""
    import os

    from typer.testing import CliRunner

    from pdcli.cli import app

    out = str(tmp_path / "prof")
    r = CliRunner().invoke(app, ["profile", "--model", "dummy:tiny-llama", "--device", "cpu", "--out", out,
                                 "--max-seconds", "30", "--num-kv-blocks", "2048", "--max-num-batched-tokens", "256",
                                 "--max-num-seqs", "16", "--max-model-len", "2048"])
    assert r.exit_code == 0, r.stderr
    data = load_profile(out)
    assert data["model"] == "dummy:tiny-llama" and data["provenance"]["kernel_path"] == "reference"
    assert len(data["prefill"]["ms"]) >= 4 and len(data["decode"]["ms"]) >= 4 and data["transfer"]["cpu-gloo"]["ms"]
    r = CliRunner().invoke(app, ["fit", out])
    assert r.exit_code == 0, r.stderr
    params = json.load(open(os.path.join(out, "params.json")))
    assert {"prefill", "decode", "interference", "transfer"} <= set(params)
    assert os.path.getsize(os.path.join(out, "fit.png")) > 1000
    r = CliRunner().invoke(app, ["fit", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "pdcli profile" in r.stderr


def test_transfer_cost_follows_the_worker_pair():
    from pdcli.workers.layout import WorkerSpec, transfer_pair

    spec = lambda dev: WorkerSpec(0, "prefill", dev)  # noqa: E731
    assert [transfer_pair(spec(a), spec(b)) for a, b in (("cpu", "cpu"), ("cuda:0", "cuda:0"), ("cuda:0", "cuda:1"))] \
        == ["cpu-gloo", "gpu-ipc", "gpu-nccl"]
    cm = cost_model()
    cm.transfer = {"gpu-ipc": (0.05, 180.0), "gpu-nccl": (0.3, 20.0)}
    r = AdaptiveRouter(cm)
    ipc = r.predict(8000, 200, None, load(0), load(8), "gpu-ipc")["disaggregated"]["transfer_ms"]
    nccl = r.predict(8000, 200, None, load(0), load(8), "gpu-nccl")["disaggregated"]["transfer_ms"]
    kv = 8000 * 131072
    assert ipc == pytest.approx(0.05 + kv / 180e6) and nccl == pytest.approx(0.3 + kv / 20e6)


def test_workers_sharing_a_gpu_are_priced_by_their_decodes_and_the_gpus_prefill_share():
    """Workers on one GPU: another worker's decode batch slows a decode step (both read the weights: ~2x) and a
    prefill a little; the prefill work routed to any worker on the GPU takes its share rho of the GPU's time,
    stretching every decode step on it by 1 / (1 - rho). Idle neighbours and CPU workers do not count."""
    from pdcli.router.cost_model import PREFILL_BESIDE_DECODE
    from pdcli.router.latency import prefill_share
    from pdcli.router.load import LoadForecast, mark_gpu_sharing

    loads = {0: load(8), 1: load(0, queued=4000), 2: load(4), 3: load(4)}
    mark_gpu_sharing(loads, {0: "cuda:0", 1: "cuda:0", 2: "cuda:1", 3: "cpu"})
    assert [loads[r].sharing for r in range(4)] == [0, 1, 0, 0]  # prompts queued on rank 1 are not decodes
    assert [loads[r].sharing_avg for r in range(4)] == [0, 1, 0, 0]
    # over a whole decode a neighbour counts by the fraction of time it decodes
    mark_gpu_sharing(loads, {0: "cuda:0", 1: "cuda:0", 2: "cuda:1", 3: "cpu"}, {0: 0.9, 1: 0.5, 2: 1.0, 3: 1.0})
    assert [loads[r].sharing_avg for r in range(4)] == [0.5, 0.9, 0, 0]
    r = router()
    alone = r.predict(2000, 200, load(8), load(0), load(8))
    shared = r.predict(2000, 200, WorkerLoad(decode_batch=8, decode_ctx=8 * 1500, sharing=1, sharing_avg=1.0),
                       load(0), load(8))
    assert shared["collocated"]["ttft_ms"] == pytest.approx(PREFILL_BESIDE_DECODE * alone["collocated"]["ttft_ms"])
    assert shared["collocated"]["tpot_ms"] == pytest.approx(2 * alone["collocated"]["tpot_ms"])
    assert shared["disaggregated"] == alone["disaggregated"]
    # with the factors `pdcli profile` measured on the device, those instead
    r.cm.sharing = dict(decode_beside_decode=1.6, prefill_beside_decode=1.2)
    alone = r.predict(2000, 200, load(8), load(0), load(8))
    shared = r.predict(2000, 200, WorkerLoad(decode_batch=8, decode_ctx=8 * 1500, sharing=1, sharing_avg=1.0),
                       load(0), load(8))
    assert shared["collocated"]["ttft_ms"] == pytest.approx(1.2 * alone["collocated"]["ttft_ms"])
    assert shared["collocated"]["tpot_ms"] == pytest.approx(1.6 * alone["collocated"]["tpot_ms"])
    r.cm.sharing = {}
    # a prefill worker on the decode worker's GPU: its prompts take their share of that GPU
    pre, dec = WorkerLoad(role="prefill", device="cuda:0"), WorkerLoad(role="decode", device="cuda:0", decode_batch=8,
                                                                          decode_ctx=8 * 1500)
    forecast = LoadForecast()
    for i in range(21):  # 2 prompts of 2000 tokens per second for 10 s
        forecast.route(i * 0.5, 0, 1, 2000, 200)
    forecast.apply({0: pre, 1: dec}, 10.0)
    assert dec.prefill_per_s == 0 and dec.gpu_prefill_per_s == pytest.approx(pre.prefill_per_s, rel=1e-9)
    assert pre.prefill_per_s == pytest.approx(2, rel=0.05)
    rho = prefill_share(r.cm, dec)
    assert rho == pytest.approx(2 * float(r.cm.prefill_work_ms(2000)) / 1e3, rel=0.05) and 0.1 < rho < 0.95
    idle_gpu = WorkerLoad(role="decode", device="cuda:0", decode_batch=8, decode_ctx=8 * 1500)
    assert r.tpot_ms(2000, 200, dec) > r.tpot_ms(2000, 200, idle_gpu) / (1 - rho) * 0.99


def test_ttft_waits_for_the_steps_a_worker_has_already_scheduled():
    """A busy worker with async scheduling has two steps scheduled when its last one lands: a prompt arriving
    now runs in the third, so it waits for two steps (priced by the model) less the time since that landing,
    at least one step; without async scheduling (a prefill worker) it waits for the running step. An idle
    worker, or one whose steps the coordinator has not seen yet, starts it at once."""
    from pdcli.router import latency

    r = router()
    cm = r.cm
    step = float(cm.decode_ms(8, 8000))
    busy = lambda since, **kw: WorkerLoad(decode_batch=8, decode_ctx=8000, since_step_ms=since, **kw)  # noqa: E731
    assert latency.start_wait_ms(cm, busy(0.0)) == pytest.approx(2 * step)
    assert latency.start_wait_ms(cm, busy(0.4 * step)) == pytest.approx(1.6 * step)
    assert latency.start_wait_ms(cm, busy(5 * step)) == pytest.approx(step)  # a long step: at least the next one
    assert latency.start_wait_ms(cm, busy(0.0, sharing=1)) == pytest.approx(4 * step)  # slowed like the rest
    prefill = lambda since, q: WorkerLoad(queued_prefill_tokens=q, since_step_ms=since, async_steps=False,  # noqa: E731
                                          role="prefill")
    running = cm.queued_prefill_ms(1500)
    assert latency.start_wait_ms(cm, prefill(10.0, 1500)) == pytest.approx(running - 10.0)
    assert latency.start_wait_ms(cm, prefill(running + 1, 1500)) == 0.0
    assert latency.start_wait_ms(cm, WorkerLoad(since_step_ms=1.0)) == 0.0  # idle: nothing scheduled
    assert latency.start_wait_ms(cm, WorkerLoad(decode_batch=8, decode_ctx=8000)) == 0.0  # no step seen yet
    # prompts that came before the last step ended ride in the scheduled steps (within their token budget) and
    # lengthen them; those that came after are ahead of this prompt
    base = r.ttft_ms(1000, busy(0.0))
    assert base - r.ttft_ms(1000, busy(3.0)) == pytest.approx(3.0)  # the measured phase, not scaled
    old = r.ttft_ms(1000, busy(0.0, queued_prefill_tokens=1500))
    new = r.ttft_ms(1000, busy(0.0, queued_prefill_tokens=1500, queued_since_step_tokens=1500))
    assert base < old and base < new
    assert old - base == pytest.approx(cm.prefill_in_decode_ms(1500, 8, 8000))
    assert r.ttft_ms(1000, busy(0.0, queued_prefill_tokens=20000)) > old  # past two steps' budget: waits too
    # without a step seen, every queued prompt is ahead, as before
    assert r.ttft_ms(1000, load(8, 1000, queued=1500)) > r.ttft_ms(1000, load(8, 1000))


def test_calibration_learns_per_role_and_metric_and_follows_drift():
    """TTFT by an offset in ms, TPOT by a ratio; the median of recent residuals, shrunk by the prior."""
    from pdcli.router.calibration import LatencyCalibration

    cal = LatencyCalibration(clock=lambda: 0.0)  # no time passes: fading with time is tested apart
    rng = np.random.default_rng(0)
    coll = dict(ttft_ms="collocated", tpot_ms="collocated")
    assert cal.correction("collocated", "ttft_ms") == 0.0 and cal.factor("collocated", "tpot_ms") == 1.0
    for _ in range(150):
        cal.observe(coll, dict(ttft_ms=20.0, tpot_ms=5.0), dict(ttft_ms=30.0 + rng.normal(0, 1), tpot_ms=7.5))
    shrink = 150 / (150 + 4)  # 150 residuals against the prior's 4 pseudo-observations (TTFT), 64 (TPOT)
    assert cal.correction("collocated", "ttft_ms") == pytest.approx(10.0 * shrink, rel=0.05)
    assert cal.factor("collocated", "tpot_ms") == pytest.approx(1.5 ** (150 / (150 + 64)), rel=1e-6)
    assert cal.correction("prefill", "ttft_ms") == 0.0
    # a skewed residual (a few requests met a burst): the median, not the mean; past a window, only it counts
    for i in range(300):
        cal.observe(coll, dict(ttft_ms=20.0), dict(ttft_ms=16.0 if i % 5 else 200.0))
    shrink = 256 / (256 + 4)
    assert cal.correction("collocated", "ttft_ms") == pytest.approx(-4.0 * shrink, rel=1e-6)  # it followed
    fixed = cal.apply(coll, dict(ttft_ms=100.0, tpot_ms=4.0, e2e_ms=0.0), out_len=11)
    assert fixed["ttft_ms"] == pytest.approx(100.0 - 4.0 * shrink) and fixed["e2e_ms"] == pytest.approx(
        fixed["ttft_ms"] + 10 * fixed["tpot_ms"])
    assert cal.apply(coll, dict(ttft_ms=5.0), out_len=1)["ttft_ms"] == 2.5  # never below half the prediction


def test_router_outcomes_correct_its_predictions_and_can_change_the_path():
    """The router's decision keeps the cost model's raw predictions; outcomes slower than predicted on the
    chosen path's workers raise that path's predictions until the other one wins."""
    r = router()
    pre, dec = WorkerLoad(role="prefill"), WorkerLoad(decode_batch=8, decode_ctx=8 * 1500, role="decode")
    first = r.decide(8000, 200, load(1), pre, dec, "gpu-nccl")
    assert first.path == "disaggregated" and first.predicted == first.predicted_raw
    assert first.roles == dict(collocated=dict(ttft_ms="collocated", tpot_ms="collocated"),
                               disaggregated=dict(ttft_ms="prefill", tpot_ms="decode"))
    raw = first.predicted_raw["disaggregated"]
    for _ in range(200):  # the prefill and decode workers keep coming out 4x slower than predicted
        r.observe(8000, 200, first.roles["disaggregated"], raw,
                  dict(ttft_ms=4 * raw["ttft_ms"], tpot_ms=4 * raw["tpot_ms"]))
    later = r.decide(8000, 200, load(1), pre, dec, "gpu-nccl")
    assert later.predicted_raw["disaggregated"]["ttft_ms"] == raw["ttft_ms"]  # the cost model is unchanged
    role = 200 / (200 + 64)  # the decode role's share of its correction; its length class's, shrunk toward it
    assert later.predicted["disaggregated"]["tpot_ms"] == pytest.approx(4 ** (role + (1 - role) * role) * raw["tpot_ms"],
                                                                        rel=0.02)
    assert later.predicted["collocated"] == later.predicted_raw["collocated"]
    assert later.path == "collocated"


def test_collocated_workers_serving_both_paths_share_one_correction():
    """With pd_on_collocated every phase runs on a collocated worker: outcomes of either path correct both
    alike, so the path routed under heavier load is not made to look worse than the other."""
    r = router()
    a, b = load(8), load(16)
    d = r.decide(2000, 200, a, b, a, "gpu-nccl")
    assert d.roles["disaggregated"] == d.roles["collocated"]
    for _ in range(50):
        r.observe(2000, 200, d.roles["collocated"], d.predicted_raw["collocated"],
                  dict(ttft_ms=2 * d.predicted_raw["collocated"]["ttft_ms"]))
    later = r.decide(2000, 200, a, b, a, "gpu-nccl")
    for path in ("collocated", "disaggregated"):
        ratio = later.predicted[path]["ttft_ms"] / later.predicted_raw[path]["ttft_ms"]
        assert ratio == pytest.approx(2.0, rel=0.05)


def test_profiled_sharing_factors_reach_the_cost_model(tmp_path):
    """`pdcli profile --sharing` measures a decode and a prefill step beside a decoding neighbour on the same
    device (two fresh processes; on this CPU they split the cores); fit and load carry the factors."""
    from pdcli.profile_sharing import SharingShapes, profile_sharing

    shapes = SharingShapes(batch=4, ctx=32, prompt=64, reps=3, block_size=8, grid_own=(16, 64),
                           grid_neighbour=(32, 128), grid_decode_batch=(2, 8))
    got = profile_sharing("dummy:tiny-llama", "cpu", {}, shapes, timeout_s=120)
    for k in ("decode_beside_decode", "prefill_beside_decode", "decode_beside_prefill", "prefill_beside_prefill"):
        assert 0.2 < got[k] < 20, got  # measured (noisy on 2 busy cores), not a constant
    assert got["decode_beside_decode"] == got["decode_beside_ms"] / got["decode_alone_ms"]
    assert shapes.within(64).grid_neighbour == (32,) and shapes.within(64).grid_own == (16, 64)  # an engine's limit
    grid = got["beside_prefill_grid"]  # each own prompt (0: the decode batch) beside each neighbour prompt
    assert sorted((g["own"], g["neighbour"]) for g in grid) == [(o, n) for o in (0, 16, 64) for n in (32, 128)]
    assert all(g["own_alone_ms"] > 0 and g["own_beside_ms"] > 0 and g["neighbour_ms"] > 0 for g in grid)
    beside_decode = got["beside_decode_grid"]  # each own prompt beside each of the neighbour's decode batches
    assert [(g["own"], g["neighbour_batch"]) for g in beside_decode] == [(o, b) for b in (4, 2, 8) for o in (16, 64)]
    assert all(g["neighbour"] == 0 and g["own_beside_ms"] > 0 for g in beside_decode)
    assert all((g["neighbour_ms"] == got["decode_alone_ms"]) == (g["neighbour_batch"] == 4) for g in beside_decode)
    torch.save(dict(synthetic_profile(), sharing=got), tmp_path / "profile_data.pt")
    write_params(str(tmp_path), fit_profile(load_profile(str(tmp_path))))
    cm = load_cost_model(str(tmp_path))
    assert cm.decode_neighbour_extra == pytest.approx(max(0, got["decode_beside_decode"] - 1))
    assert cm.prefill_neighbour_extra == pytest.approx(max(0, got["prefill_beside_decode"] - 1))
    assert cm.decode_beside_prefill_extra == pytest.approx(max(0, got["decode_beside_prefill"] - 1))
    assert CostModel(**{**cm.__dict__, "sharing": {}}).decode_neighbour_extra == 1.0  # unmeasured: 2x
    assert CostModel(**{**cm.__dict__, "sharing": {}}).decode_beside_prefill_extra is None  # unmeasured: it waits
    # a prompt's step beside a prefilling neighbour: (f - 1) of the neighbour's step, both prefills of one shape
    assert cm.prompt_beside_prefill_share == pytest.approx(max(0, got["prefill_beside_prefill"] - 1))
    older = CostModel(**{**cm.__dict__, "sharing": {k: v for k, v in cm.sharing.items() if k != "prefill_beside_prefill"}})
    assert older.prompt_beside_prefill_share == older.beside_prefill_share  # profiles before it: the decode's share
    assert len(cm.sharing["prompt_beside_prefill_points"]) == 4 and len(cm.sharing["decode_beside_prefill_points"]) == 2
    assert len(cm.sharing["prompt_beside_decode_points"]) == 6  # one per ratio of own to neighbour step


def test_unequal_prompts_beside_a_prefill_are_priced_from_the_profiled_grid():
    """A prompt's step beside a neighbour's prefill gains a share of the neighbour's step that depends on how the
    two compare: `fit` turns the profile's grid (each own length beside each neighbour length) into points (own
    step / neighbour step, extra / neighbour step), and the cost model interpolates them in log(ratio), held at
    the ends, checked here against numpy's interpolation; the router's TTFT and the planner's steps price with it.
    Without the grid, the equal-length share prices every ratio."""
    from types import SimpleNamespace

    from pdcli.plan.sim import shared_step_ms
    from pdcli.router import latency
    from pdcli.router.fit import fit_sharing
    from pdcli.router.load import mark_gpu_sharing

    grid = [dict(own=256, neighbour=8192, own_alone_ms=15.0, own_beside_ms=135.0, neighbour_ms=240.0),
            dict(own=1024, neighbour=8192, own_alone_ms=40.0, own_beside_ms=160.0, neighbour_ms=240.0),
            dict(own=256, neighbour=1024, own_alone_ms=15.0, own_beside_ms=35.0, neighbour_ms=40.0),
            dict(own=1024, neighbour=1024, own_alone_ms=40.0, own_beside_ms=76.0, neighbour_ms=40.0),
            dict(own=0, neighbour=1024, own_alone_ms=7.0, own_beside_ms=17.0, neighbour_ms=40.0)]
    sharing = fit_sharing(dict(prefill_beside_prefill=1.9, decode_beside_prefill=2.4, beside_prefill_grid=grid))
    pts = sharing["prompt_beside_prefill_points"]
    assert np.allclose(pts, [[0.0625, 0.5], [1 / 6, 0.5], [0.375, 0.5], [1.0, 0.9]], rtol=1e-5)
    assert sharing["decode_beside_prefill_points"] == [[0.175, 0.25]]
    cm = _fitted(synthetic_profile())
    cm.sharing = sharing
    xs, ys = np.log([p[0] for p in pts]), [p[1] for p in pts]
    for own, theirs in ((15.0, 240.0), (30.0, 240.0), (100.0, 200.0), (40.0, 40.0), (80.0, 40.0), (1.0, 300.0)):
        ref = float(np.interp(np.log(own / theirs), xs, ys)) * theirs
        assert cm.prompt_beside_prefill_ms(own, theirs) == pytest.approx(ref)
    assert cm.prompt_beside_prefill_ms(80.0, 40.0) == pytest.approx(0.9 * 40.0)  # held past the last point
    equal = CostModel(**{**cm.__dict__, "sharing": dict(prefill_beside_prefill=1.9, decode_beside_prefill=2.4)})
    assert equal.prompt_beside_prefill_ms(15.0, 240.0) == pytest.approx(equal.prompt_beside_prefill_share * 240.0)

    me = SimpleNamespace(cm=cm)  # the planner: a 256-token step beside a neighbour's 8k chunk
    theirs = SimpleNamespace(idle=False, step_has_decodes=False, busy_until=1.0,
                             running=SimStep(chunks=[(None, 8192, 0)], ending=[], decode_rows=0, ms=240.0))
    mine = SimStep(chunks=[(None, 256, 0)], ending=[], decode_rows=0, ms=15.0)
    assert shared_step_ms(me, mine, [theirs], 0.0) == pytest.approx(15.0 + cm.prompt_beside_prefill_ms(15.0, 240.0))
    loads = {0: WorkerLoad(queued_prefill_tokens=10_000, device="cuda:0"),  # the router: the same price
             1: WorkerLoad(role="prefill", async_steps=False, device="cuda:0", since_step_ms=1e4)}
    mark_gpu_sharing(loads, {0: "cuda:0", 1: "cuda:0"})
    own = float(cm.prefill_ms(256)) * cm.prefill_role_scale
    their_step = float(cm.step_ms(0, 0, [(cm.max_num_batched_tokens, 0)]))
    assert latency.ttft_ms(cm, loads[1], 256) == pytest.approx(own + cm.prompt_beside_prefill_ms(own, their_step))

    # a decode step beside that prefill: its own share from the grid's decode points, in the planner and in the
    # wait for the steps a collocated worker has scheduled while its neighbour prefills
    dec_pts = sharing["decode_beside_prefill_points"]
    assert cm.decode_beside_prefill_ms(7.0, 40.0) == pytest.approx(0.25 * 40.0)  # one point: held everywhere
    assert equal.decode_beside_prefill_ms(7.0, 40.0) == pytest.approx(equal.beside_prefill_share * 40.0)
    decode = SimStep(chunks=[], ending=[], decode_rows=8, ms=7.0)
    assert shared_step_ms(me, decode, [theirs], 0.0) == pytest.approx(7.0 + dec_pts[0][1] * 240.0)
    col = {0: WorkerLoad(decode_batch=8, decode_ctx=8 * 300, device="cuda:0", since_step_ms=0.0),
           1: WorkerLoad(role="prefill", queued_prefill_tokens=10_000, device="cuda:0")}
    mark_gpu_sharing(col, {0: "cuda:0", 1: "cuda:0"})
    alone = float(cm.decode_ms(8, 2400))
    step = alone * (1 + cm.decode_neighbour_extra * col[0].sharing) + cm.decode_beside_prefill_ms(alone, their_step)
    assert latency.scheduled_step_ms(cm, col[0]) == pytest.approx(step)
    assert latency.start_wait_ms(cm, col[0]) == pytest.approx(2 * step)  # two scheduled, the first just begun
    col[0].neighbour_queued_tokens = 0  # the neighbour idle: the step on average (step_ms)
    assert latency.scheduled_step_ms(cm, col[0]) == pytest.approx(latency.step_ms(cm, col[0], stretched=False))
    col[0].neighbour_queued_tokens = 10_000  # without the grid: the average too (the equal-length share over-priced)
    assert latency.scheduled_step_ms(equal, col[0]) == pytest.approx(latency.step_ms(equal, col[0], stretched=False))


def test_prompts_beside_a_decode_batch_are_priced_from_the_profiled_grid():
    """A prompt's step beside a neighbour's decode step gains a share of that step which depends on how the two
    compare (the factor was measured with one 1024-token prompt): `fit` turns the profile's beside-decode grid
    into points, the cost model interpolates them in log(ratio), and the planner's steps, the router's TTFT beside a
    decoding neighbour and the router's charge for a prefill beside a decode batch all price with it. Without the
    grid, the factor's share prices every ratio (the committed profiles: their replays and plans unchanged)."""
    from types import SimpleNamespace

    from pdcli.plan.sim import shared_step_ms
    from pdcli.router import latency
    from pdcli.router.fit import fit_sharing

    grid = [dict(own=256, neighbour=0, own_alone_ms=10.0, own_beside_ms=22.0, neighbour_ms=8.0),
            dict(own=1024, neighbour=0, own_alone_ms=24.0, own_beside_ms=33.0, neighbour_ms=8.0),
            dict(own=4096, neighbour=0, own_alone_ms=100.0, own_beside_ms=110.0, neighbour_ms=8.0)]
    sharing = fit_sharing(dict(prefill_beside_decode=1.37, decode_beside_prefill=2.4, beside_decode_grid=grid))
    pts = sharing["prompt_beside_decode_points"]
    assert np.allclose(pts, [[1.25, 1.5], [3.0, 1.125], [12.5, 1.25]], rtol=1e-5)
    assert "prompt_beside_prefill_points" not in sharing  # that grid was not measured
    cm = _fitted(synthetic_profile())
    cm.sharing = sharing
    xs, ys = np.log([p[0] for p in pts]), [p[1] for p in pts]
    for own, theirs in ((10.0, 8.0), (16.0, 8.0), (50.0, 8.0), (5.0, 8.0), (300.0, 8.0)):
        assert cm.prompt_beside_decode_ms(own, theirs) == pytest.approx(float(np.interp(np.log(own / theirs), xs, ys)) * theirs)
    factor = CostModel(**{**cm.__dict__, "sharing": dict(prefill_beside_decode=1.37, decode_beside_prefill=2.4)})
    assert factor.prompt_beside_decode_ms(10.0, 8.0) == pytest.approx(factor.beside_decode_share * 8.0)
    assert CostModel(**{**cm.__dict__, "sharing": {}}).prompt_beside_decode_ms(10.0, 8.0) is None

    me = SimpleNamespace(cm=cm)  # the planner: a 256-token step beside a neighbour's decode step
    theirs = SimpleNamespace(idle=False, step_has_decodes=True, busy_until=1.0,
                             running=SimStep(chunks=[], ending=[], decode_rows=32, ms=8.0))
    mine = SimStep(chunks=[(None, 256, 0)], ending=[], decode_rows=0, ms=10.0)
    assert shared_step_ms(me, mine, [theirs], 0.0) == pytest.approx(10.0 + 1.5 * 8.0)
    w = WorkerLoad(role="prefill", async_steps=False, device="cuda:0", neighbour_decode_batch=32,
                   neighbour_decode_ctx=32 * 512, neighbour_decoders=1)
    dec = float(cm.decode_ms(32, 32 * 512))
    assert latency.neighbour_ms(cm, w, 2, 10.0) == pytest.approx(2 * cm.prompt_beside_decode_ms(10.0, dec))
    assert latency.neighbour_ms(factor, w, 2, 10.0) == pytest.approx(2 * factor.beside_decode_share * dec)
    # the router's charge: a decode batch o beside w's prefill steps loses aT / (s (1 - b) + aT) per ms of them
    o = WorkerLoad(decode_batch=32, decode_ctx=32 * 512, device="cuda:0")
    step, s = float(cm.step_ms(0, 0, [(256, 0)])), float(cm.decode_ms(32, 32 * 512))
    for model in (cm, factor):
        a, b = model.beside_prefill_share, min(1.0, model.prompt_beside_decode_ms(step, s) / s)
        loss = AdaptiveRouter(model)._beside_loss(256, 0, WorkerLoad(role="prefill", device="cuda:0"), o)
        assert loss == pytest.approx(a * step / (s * (1 - b) + a * step))


def test_sharing_only_adds_the_factors_to_an_existing_profile(tmp_path, monkeypatch):
    """`pdcli profile --sharing-only --out DIR` measures only the neighbour factors and adds them, with their own
    provenance, to the profile in DIR (one made without them), keeping its other measurements; `pdcli fit` then
    carries both. It needs --out, a profile there, and the same model and device name."""
    import os

    from typer.testing import CliRunner

    import pdcli.cli.profile as cli_profile
    from pdcli.cli import app
    from pdcli.profiler import device_name

    base = dict(synthetic_profile(), model="dummy:tiny-llama", device=device_name(torch.device("cpu")))
    torch.save(base, tmp_path / "profile_data.pt")
    factors = dict(decode_beside_decode=1.5, prefill_beside_decode=1.25, decode_beside_prefill=2.5, mps=False)
    monkeypatch.setattr(cli_profile, "_measure_sharing", lambda model, kw, progress: dict(factors))
    args = ["profile", "--model", "dummy:tiny-llama", "--device", "cpu", "--sharing-only"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path)])
    assert r.exit_code == 0, r.stderr
    data = load_profile(str(tmp_path))
    assert data["sharing"] == factors and data["sharing_provenance"]["command"].startswith("pdcli")
    assert data["prefill"] == base["prefill"] and data["provenance"] == base["provenance"]
    r = CliRunner().invoke(app, ["fit", str(tmp_path), "--no-plots"])
    assert r.exit_code == 0, r.stderr
    params = json.load(open(os.path.join(tmp_path, "params.json")))
    assert params["sharing"] == {k: v for k, v in factors.items() if k != "mps"}
    assert params["provenance"]["sharing"]["device"] == base["device"]
    assert load_cost_model(str(tmp_path)).decode_beside_prefill_extra == pytest.approx(1.5)
    for extra, message in (([], "needs --out"), (["--out", str(tmp_path / "none")], "no profile_data.pt"),
                           (["--out", str(tmp_path), "--model", "dummy:tiny-qwen3"], "not dummy:tiny-qwen3")):
        r = CliRunner().invoke(app, [*args, *extra])
        assert r.exit_code == 2 and message in r.stderr, r.stderr


def test_a_measured_decode_beside_prefill_factor_replaces_waiting_for_the_neighbours_prefill():
    """Unmeasured, a decode step on a GPU whose neighbour prefills is stretched by the GPU's whole prefill share
    (1 / (1 - rho): time-slicing). Measured, by its own prompts' share only; while the neighbour prefills (the
    fraction b of the time its prompts take, stretched by our steps beside them) each step gains a share of the
    neighbour's step T (a prompt of the size-biased mean length), and the decode's pace is the harmonic mean of
    the two step times. The planner's decode step beside a prefilling neighbour gains the same share of its step;
    unmeasured it waits for it."""
    from types import SimpleNamespace

    from pdcli.plan.sim import shared_step_ms
    from pdcli.router import latency

    cm = _fitted(synthetic_profile())
    dec = WorkerLoad(role="decode", decode_batch=8, decode_ctx=8 * 1500, device="cuda:0", prefill_per_s=0.0,
                     gpu_prefill_per_s=2.0, gpu_prefill_tokens_per_s=4000.0, gpu_prefill_sq_tokens_per_s=8e6)
    alone = float(cm.decode_ms(8, 8 * 1500))
    rho = latency.prefill_share(cm, dec)
    assert 0 < rho < 0.95 and latency.step_ms(cm, dec) == pytest.approx(alone / (1 - rho))
    cm.sharing = dict(decode_beside_prefill=1.3, prefill_beside_decode=1.2)
    share, share_d = cm.beside_prefill_share, cm.beside_decode_share
    theirs = float(cm.prefill_ms(2000))  # 8e6 / 4000: prompts of 2000 tokens
    b = min(1.0, rho * (1 + share_d * alone / theirs))
    slow = alone + share * theirs
    assert latency.step_ms(cm, dec) == pytest.approx(alone / ((1 - b) + b * alone / slow))
    assert alone < latency.step_ms(cm, dec) < alone * (1 + b * (slow / alone - 1))  # less than the time-average
    me = SimpleNamespace(cm=cm)
    neighbour = SimpleNamespace(idle=False, step_has_decodes=False, busy_until=1.0,
                                running=SimStep(chunks=[(None, 1024, 0)], ending=[], decode_rows=0, ms=30.0))
    decode = SimStep(chunks=[], ending=[], decode_rows=8, ms=10.0)
    assert shared_step_ms(me, decode, [neighbour], 0.0) == pytest.approx(10.0 + share * 30.0)
    cm.sharing = {}
    assert shared_step_ms(me, decode, [neighbour], 0.0) == pytest.approx(10.0 + 1000.0)  # waits 1 s


def test_a_step_with_a_prompt_beside_a_neighbours_prefill_gains_a_share_of_the_neighbours_step():
    """Under MPS the kernels of two prefilling processes alternate: a small prompt's step beside a neighbour's
    long chunk takes a share of the neighbour's step (and beside decoding neighbours a share of each one's step) (measured on one H200: a 256-token step, 9 ms alone, took
    100-170 ms beside 8k-token chunks). The share comes from the profiled decode beside a prefill at the
    profile's shapes; the router's TTFT and the planner's steps price it alike; unmeasured, nothing changes."""
    from types import SimpleNamespace

    from pdcli.plan.sim import shared_step_ms
    from pdcli.profile_sharing import SharingShapes
    from pdcli.router import latency
    from pdcli.router.load import mark_gpu_sharing

    cm = _fitted(synthetic_profile())
    loads = {0: WorkerLoad(queued_prefill_tokens=10_000, decode_batch=4, decode_ctx=4 * 300, device="cuda:0"),
             1: WorkerLoad(role="prefill", async_steps=False, device="cuda:0", since_step_ms=1e4),
             2: WorkerLoad(queued_prefill_tokens=5_000, device="cuda:1")}
    mark_gpu_sharing(loads, {0: "cuda:0", 1: "cuda:0", 2: "cuda:1"})
    pre = loads[1]
    assert (pre.neighbour_queued_tokens, pre.neighbour_decode_batch, pre.neighbour_decode_ctx) == (10_000, 4, 1200)
    assert loads[0].neighbour_queued_tokens == 0 and loads[2].neighbour_queued_tokens == 0  # not on cuda:0
    assert cm.beside_prefill_share is None
    alone = latency.ttft_ms(cm, pre, 256)
    assert alone == pytest.approx(float(cm.prefill_ms(256)) * cm.prefill_role_scale * (1 + cm.prefill_neighbour_extra))
    cm.sharing = dict(decode_beside_prefill=2.0, prefill_beside_decode=1.2, decode_beside_decode=1.5)
    s = SharingShapes()
    share = float(cm.decode_ms(s.batch, s.batch * s.ctx)) / float(cm.prefill_ms(s.prompt))
    assert cm.beside_prefill_share == pytest.approx(share)
    chunk = cm.max_num_batched_tokens - 4
    their_step = cm.step_ms(4, 1200, [(chunk, 0)])
    own = float(cm.prefill_ms(256)) * cm.prefill_role_scale  # no decoding-neighbour factor on top
    assert latency.ttft_ms(cm, pre, 256) == pytest.approx(own + share * their_step)
    pre.neighbour_queued_tokens = chunk + 100  # a long prompt outlasts the neighbour's prefill: at most all of it
    long = 10 * cm.max_num_batched_tokens
    cap = cm.queued_prefill_ms(chunk + 100, 4, 1200)
    assert 10 * share * their_step > cap
    own_long = float(cm.chunked_prefill_ms(long)) * cm.prefill_role_scale
    assert latency.ttft_ms(cm, pre, long) == pytest.approx(own_long + cap)

    me = SimpleNamespace(cm=cm)
    theirs = SimpleNamespace(idle=False, step_has_decodes=True, busy_until=1.0,
                             running=SimStep(chunks=[(None, chunk, 0)], ending=[], decode_rows=4, ms=their_step))
    mine = SimStep(chunks=[(None, 256, 0)], ending=[], decode_rows=0, ms=9.0)
    assert shared_step_ms(me, mine, [theirs], 0.0) == pytest.approx(9.0 + share * their_step)
    theirs.running = SimStep(chunks=[], ending=[], decode_rows=4, ms=6.0)  # decoding only: a share of its step
    share_d = cm.beside_decode_share
    assert share_d == pytest.approx(0.2 * float(cm.prefill_ms(s.prompt)) / float(cm.decode_ms(s.batch, s.batch * s.ctx)))
    assert shared_step_ms(me, mine, [theirs], 0.0) == pytest.approx(9.0 + share_d * 6.0)
    pre.neighbour_queued_tokens = 0  # the router the same: beside the neighbour's decode steps
    assert latency.ttft_ms(cm, pre, 256) == pytest.approx(own + share_d * float(cm.decode_ms(4, 1200)))
    two = {0: WorkerLoad(decode_batch=4, decode_ctx=1200, device="cuda:0"),  # two neighbours decode: two steps
           1: WorkerLoad(role="prefill", async_steps=False, device="cuda:0", since_step_ms=1e4),
           2: WorkerLoad(role="decode", decode_batch=12, decode_ctx=3600, device="cuda:0")}
    mark_gpu_sharing(two, {0: "cuda:0", 1: "cuda:0", 2: "cuda:0"})
    assert (two[1].neighbour_decode_batch, two[1].neighbour_decoders) == (16, 2)
    both = 2 * float(cm.decode_ms(8, 2400))  # = decode_ms(4, 1200) + decode_ms(12, 3600): the form is linear
    assert both == pytest.approx(float(cm.decode_ms(4, 1200)) + float(cm.decode_ms(12, 3600)))
    assert both > float(cm.decode_ms(16, 4800))  # one step of the summed batch would miss a weight read
    assert latency.ttft_ms(cm, two[1], 256) == pytest.approx(own + share_d * both)


def test_a_prefill_worker_as_it_serves_scales_its_prefill_prices(tmp_path):
    """The profile's burst through a real pair (on this CPU, tiny model) -> `fit`'s scale = the last first token
    measured over what the fitted steps predict for the burst; the router prices a dedicated prefill worker's
    prompts (and the planner its steps) with it, nobody else's."""
    from pdcli.profiler import profile_transfer
    from pdcli.router import latency

    served = {}
    profile_transfer("dummy:tiny-llama", "cpu", dict(num_kv_blocks=256), lengths=(32, 64), repeats=1, served=served)
    assert served["prompts"] == 8 and served["prompt_len"] == 64 and served["last_first_token_ms"] > 0
    data = synthetic_profile()
    cm0 = _fitted(data)
    want = float(cm0.queued_prefill_ms(7 * 64, sq_tokens=7 * 64**2) + cm0.chunked_prefill_ms(64))  # 7 queued, then its own
    data["served_prefill"] = dict(prompts=8, prompt_len=64, last_first_token_ms=1.5 * want)
    torch.save(data, tmp_path / "profile_data.pt")
    write_params(str(tmp_path), fit_profile(load_profile(str(tmp_path))))
    cm = load_cost_model(str(tmp_path))
    assert cm.prefill_role_scale == pytest.approx(1.5)
    queued = dict(queued_prefill_tokens=3000, steps_seen=True, since_step_ms=None)
    pre, coll = WorkerLoad(role="prefill", **queued), WorkerLoad(role="collocated", **queued)
    assert latency.ttft_ms(cm, pre, 1000) == pytest.approx(1.5 * latency.ttft_ms(cm, coll, 1000))


def _fitted(data: dict) -> CostModel:
    p = fit_profile(data)
    return CostModel(p["prefill"]["params"], p["decode"]["params"], p["interference"]["params"], {},
                     p["max_num_batched_tokens"], p["kv_bytes_per_token"])


def test_prefill_rates_come_from_prompts_without_a_prefix():
    """A paged kernel's latency on a few new tokens after a long prefix (a scan of the prefix that no n c term
    describes: one H100, 16 tokens after 16k took 26 ms against 9) must not leak into the per-token rate: fitted
    all at once it raised a0 and lowered a1, and a step of several prompts was priced at 2/3 of its time."""
    p0, a0, a1, a2, a3 = TRUE["prefill"]
    n = np.array([16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192] * 4, float)
    c = np.repeat([0, 1024, 4096, 16384], 10).astype(float)
    ms = np.maximum(p0, a0 + a1 * n + a3 * n * n / 2 + np.maximum(a2 * n * c, 2e-3 * c))
    fit = fit_prefill(n, c, ms)
    assert fit.params[:3] == pytest.approx([p0, a0, a1], rel=0.05)
    assert fit.params[4] == pytest.approx(a3, rel=0.05)
    # a step of eight 1k prompts (each attends to itself only) priced as the form's own terms give it
    own = a0 + 8 * (a1 * 1024 + a3 * 1024**2 / 2)
    cm = CostModel(fit.params, TRUE["decode"], TRUE["mixed"], {}, 8192, 4096)
    assert cm.step_ms(0, 0, [(1024, 0)] * 8) == pytest.approx(own, rel=0.05)


def test_a_prompts_backlog_meets_its_decode():
    """The prompts routed to a worker while a prompt's own steps hold its token budget queue behind it and are
    prefilled during its decode: its TPOT meets the prefill work of (life + held) / life of its life's arrivals.
    Where the prefill worker is on another GPU, its backlog slows nobody's decode."""
    from pdcli.router import latency

    cm = cost_model()
    w = WorkerLoad(decode_batch=8, decode_ctx=8 * 500, prefill_per_s=4.0, prefill_tokens_per_s=4000.0,
                   prefill_sq_tokens_per_s=4e6, decode_per_s=4.0, mean_output_len=200)
    step = float(cm.decode_ms(9, 9 * 500))
    rho, _ = latency.prefill_stretch(cm, w, step)
    assert 0 < rho < 0.4 and latency.prefill_stretch(cm, w, step, backlog=2.0)[0] == pytest.approx(2 * rho)
    quick = latency.tpot_ms(cm, w, 8000, 200)
    held = latency.tpot_ms(cm, w, 8000, 200, held_ms=400.0)
    assert held > quick * 1.05
    idle = WorkerLoad(decode_batch=8, decode_ctx=8 * 500)  # nothing routed to it: nothing queues behind
    assert latency.tpot_ms(cm, idle, 8000, 200, held_ms=400.0) == latency.tpot_ms(cm, idle, 8000, 200)
    r = router()
    pre = WorkerLoad(role="prefill", prefill_per_s=4.0, prefill_tokens_per_s=4000.0, prefill_sq_tokens_per_s=4e6,
                     device="cuda:0")
    dec = WorkerLoad(role="decode", decode_batch=8, decode_ctx=8 * 500, device="cuda:1")
    apart = r.predict(8000, 200, None, pre, dec)["disaggregated"]["tpot_ms"]
    assert apart == pytest.approx(latency.tpot_ms(cm, dec, 8000, 200))
    assert r.predict(8000, 200, w, None, None)["collocated"]["tpot_ms"] == pytest.approx(
        latency.tpot_ms(cm, w, 8000, 200, held_ms=r._prefill_steps_ms(8000, 0, w)))


def test_a_decode_counts_its_own_context():
    """The forecast batch's context holds the request's own prompt and half its output, besides the others'."""
    from pdcli.router import latency

    cm = cost_model()
    w = WorkerLoad(decode_batch=8, decode_ctx=8 * 500)
    d2 = cm.decode[2]  # ms per context token in a decode step
    assert latency.tpot_ms(cm, w, 12000, 200) - latency.tpot_ms(cm, w, 256, 200) == pytest.approx(d2 * (12000 - 256))


def test_tpot_calibration_keeps_long_and_short_prompts_apart():
    """TPOT residuals are kept per prompt length class too: a class's correction is the median of its own,
    shrunk toward its role's (not toward none), so a few long prompts decoding slower than priced do not raise
    the short ones' TPOT; a class never seen takes the role's."""
    from pdcli.router.calibration import LatencyCalibration, length_class

    assert [length_class(n) for n in (256, 1023, 1024, 4095, 4096, 12000, 16384)] == [0, 0, 1, 1, 2, 2, 3]
    cal = LatencyCalibration(clock=lambda: 0.0)  # no fading
    coll = dict(ttft_ms="collocated", tpot_ms="collocated")
    for i in range(120):
        long = i % 4 == 0
        cal.observe(coll, dict(ttft_ms=20.0, tpot_ms=5.0), dict(ttft_ms=20.0, tpot_ms=7.5 if long else 5.0),
                    prompt_len=10000 if long else 256)
    role = cal.correction("collocated", "tpot_ms")
    assert role == 0.0  # 3 in 4 residuals are 0: the median
    n = 30 / (30 + 64)  # 30 long residuals against the prior's 64 pseudo-observations at the role's correction
    assert cal.correction("collocated", "tpot_ms", 10000) == pytest.approx(math.log(1.5) * n, rel=1e-6)
    assert cal.correction("collocated", "tpot_ms", 256) == 0.0
    assert cal.correction("collocated", "tpot_ms", 2000) == role  # no class-1 residuals yet
    out = cal.apply(coll, dict(ttft_ms=20.0, tpot_ms=5.0), out_len=10, prompt_len=10000)
    assert out["tpot_ms"] == pytest.approx(5.0 * 1.5 ** n)


def test_ttft_calibration_keeps_long_and_short_prompts_apart():
    """TTFT's offset is per prompt length class too: long prompts priced 30 ms short do not add 30 ms to the short
    prompts' TTFT (which the model prices right); a class never seen takes the role's offset."""
    from pdcli.router.calibration import LatencyCalibration

    cal = LatencyCalibration(clock=lambda: 0.0)
    pre = dict(ttft_ms="prefill", tpot_ms="decode")
    for i in range(12):
        long = i % 3 != 0
        cal.observe(pre, dict(ttft_ms=250.0 if long else 20.0), dict(ttft_ms=280.0 if long else 20.0),
                    prompt_len=10000 if long else 256)
    role = cal.correction("prefill", "ttft_ms")
    assert role > 0  # 2 in 3 residuals are +30 ms
    assert cal.correction("prefill", "ttft_ms", 256) == pytest.approx(role / 2)  # 4 zeros, the prior's 4 at role's
    assert cal.correction("prefill", "ttft_ms", 10000) > role
    assert cal.apply(pre, dict(ttft_ms=20.0), out_len=1, prompt_len=256)["ttft_ms"] < 20.0 + role


def test_prompts_that_join_a_step_are_priced_at_the_typical_length():
    """Behind a long prompt, the prompts that come meanwhile join the step that holds a short prompt's chunk: a
    skewed mix (90% of 256 tokens, 10% of 10k) is priced at its typical length (mean^3 / mean of squares: ~190),
    not its mean (1,230): as prompts of that one length."""
    from pdcli.router import latency
    from pdcli.router.load import WorkerLoad

    cm = cost_model()
    per_s = 10.0
    skew = WorkerLoad(decode_batch=8, decode_ctx=4000, prefill_per_s=per_s, prefill_tokens_per_s=per_s * (0.9 * 256 + 1000),
                      prefill_sq_tokens_per_s=per_s * (0.9 * 256 ** 2 + 0.1 * 10000 ** 2), async_steps=True)
    mean = skew.prefill_tokens_per_s / per_s
    typical = mean ** 3 * per_s / skew.prefill_sq_tokens_per_s
    assert 150 < typical < 256 < mean
    one = WorkerLoad(decode_batch=8, decode_ctx=4000, prefill_per_s=per_s, prefill_tokens_per_s=per_s * typical,
                     prefill_sq_tokens_per_s=per_s * typical ** 2, async_steps=True)
    joined = latency.joining_ms(cm, skew, 300.0, 10.0, 8000, 1)  # x = 3 prompts expected in the window
    assert joined > 0
    assert joined == pytest.approx(latency.joining_ms(cm, one, 300.0, 10.0, 8000, 1), rel=0.02)
    assert joined < cm.joined_prefill_ms(3 * mean, 8, 3 * mean * mean)


def test_ttft_beside_a_prefilling_neighbour_is_calibrated_apart():
    """A prompt priced while a GPU neighbour had prompts queued learns its TTFT offset under its own key: the
    residuals of those (tens of ms) do not move the others' TTFT, and theirs do not move these."""
    from pdcli.router.adaptive import BESIDE_PREFILL, calibration_roles
    from pdcli.router.load import mark_gpu_sharing

    cm = _fitted(synthetic_profile())
    router = AdaptiveRouter(cm, slo_ttft_ms=None, slo_tpot_ms=None)
    router.calibration.clock = lambda: 0.0
    loads = {0: WorkerLoad(decode_batch=4, decode_ctx=1200, device="cuda:0"),
             1: WorkerLoad(role="prefill", queued_prefill_tokens=9000, device="cuda:0")}
    mark_gpu_sharing(loads, {0: "cuda:0", 1: "cuda:0"})
    quiet = WorkerLoad(decode_batch=4, decode_ctx=1200, device="cuda:1")
    assert calibration_roles(loads[0], loads[0]) == dict(ttft_ms="collocated" + BESIDE_PREFILL, tpot_ms="collocated")
    assert calibration_roles(quiet, quiet) == dict(ttft_ms="collocated", tpot_ms="collocated")
    raw, _, roles = router.price("collocated", 256, 32, loads[0], loads[0])
    for _ in range(64):
        router.observe(256, 32, roles, raw, dict(ttft_ms=raw["ttft_ms"] + 100.0))
    beside = router.price("collocated", 256, 32, loads[0], loads[0])
    alone = router.price("collocated", 256, 32, quiet, quiet)
    role = 100.0 * 64 / 68  # 64 residuals against TTFT's prior of 4; the length class's shrunk toward it
    assert beside[1]["ttft_ms"] == pytest.approx(beside[0]["ttft_ms"] + (100.0 * 64 + role * 4) / 68, rel=1e-6)
    assert alone[1]["ttft_ms"] == pytest.approx(alone[0]["ttft_ms"])  # untouched


def test_a_neighbours_prefill_counts_only_what_it_has_left():
    """What a prompt's steps gain beside a prefilling GPU neighbour is capped by the neighbour's queued prefill less
    how far into it the neighbour is (its since_step_ms: its running step began when that prefill did), and so is
    the extra of the decode steps a collocated worker has scheduled."""
    from pdcli.router import latency
    from pdcli.router.fit import fit_sharing
    from pdcli.router.load import mark_gpu_sharing

    cm = _fitted(synthetic_profile())
    grid = [dict(own=256, neighbour=8192, own_alone_ms=15.0, own_beside_ms=135.0, neighbour_ms=240.0),
            dict(own=0, neighbour=8192, own_alone_ms=7.0, own_beside_ms=80.0, neighbour_ms=240.0)]
    cm.sharing = fit_sharing(dict(prefill_beside_prefill=1.9, decode_beside_prefill=2.4, beside_prefill_grid=grid))

    def loads(since):
        ls = {0: WorkerLoad(decode_batch=8, decode_ctx=2400, device="cuda:0", since_step_ms=0.0),
              1: WorkerLoad(role="prefill", queued_prefill_tokens=9000, device="cuda:0", since_step_ms=since)}
        mark_gpu_sharing(ls, {0: "cuda:0", 1: "cuda:0"})
        return ls

    fresh, late = loads(0.0), loads(1e9)
    assert fresh[0].neighbour_since_step_ms == 0.0 and late[0].neighbour_since_step_ms == 1e9
    total = float(cm.queued_prefill_ms(9000, 0, 0))
    assert latency.neighbour_prefill_left_ms(cm, fresh[0]) == pytest.approx(total)
    assert latency.neighbour_prefill_left_ms(cm, loads(total / 4)[0]) == pytest.approx(total * 3 / 4)
    assert latency.neighbour_prefill_left_ms(cm, late[0]) == 0.0  # it has run past its price: nothing left
    alone = float(cm.decode_ms(8, 2400))
    assert late[0].sharing == 0  # the neighbour does not decode
    assert latency.scheduled_step_ms(cm, late[0]) == pytest.approx(alone)
    assert latency.scheduled_step_ms(cm, fresh[0]) > latency.scheduled_step_ms(cm, late[0])
    assert latency.neighbour_ms(cm, late[0], 3, 15.0) == 0.0
    assert latency.neighbour_ms(cm, fresh[0], 1, 15.0) == pytest.approx(
        cm.prompt_beside_prefill_ms(15.0, latency.neighbour_chunk_ms(cm, fresh[0])))
