"""pdcli plan: the simulator steps workers under the engine's rules with the cost model's step times."""
import json

import pytest
from typer.testing import CliRunner

from pdcli.cli import app
from pdcli.plan.layouts import enumerate_layouts
from pdcli.plan.sim import SimSpec
from pdcli.plan.simulator import CoordinatorHops, Simulator
from test_cost_model import cost_model

NO_HOPS = CoordinatorHops(dispatch_ms=0.0, report_ms=0.0)  # the engine's rules alone


def one(specs, mode, prompts, outs, arrivals, **kw):
    return Simulator(cost_model(), specs, mode, **{"hops": NO_HOPS, **kw}).run(prompts, outs, arrivals)


def test_the_coordinator_hops_add_before_the_worker_and_after_its_tokens():
    """A prompt reaches an idle worker dispatch_ms after it came; its first and last tokens reach the client
    report_ms after the worker made them."""
    specs, hops = [SimSpec(0, "prefill", "n:cuda:0"), SimSpec(1, "decode", "n:cuda:1")], CoordinatorHops(2.0, 0.5)
    [bare] = one(specs, "disaggregated", [1000], [11], [0.0])
    [r] = one(specs, "disaggregated", [1000], [11], [0.0], hops=hops)
    assert r.ttft_ms == pytest.approx(bare.ttft_ms + 2.5) and r.e2el_ms == pytest.approx(bare.e2el_ms + 2.5)
    assert r.launched == pytest.approx(2e-3)  # the step with its prompt began when the prompt reached the worker


def test_one_request_takes_a_prefill_step_then_a_decode_step_per_token():
    cm = cost_model()
    [r] = one([SimSpec(0, "prefill", "n:cuda:0"), SimSpec(1, "decode", "n:cuda:1")], "disaggregated", [1000], [11], [0.0])
    prefill = cm.step_ms(0, 0, [(1000, 0)])
    assert r.ttft_ms == pytest.approx(prefill)  # a prefill worker reports its step's tokens at once
    transfer = cm.transfer_ms(1000, "gpu-nccl")
    steps = [cm.step_ms(1, 1000 + 1 + k, []) for k in range(10)]
    assert r.e2el_ms == pytest.approx(prefill + transfer + sum(steps))
    assert r.path == "disaggregated" and r.workers == (0, 1)


def test_a_worker_that_goes_idle_reports_its_last_step_at_once():
    """Async scheduling holds a step's tokens until the next step ends; with no next step (the worker is idle)
    the engine lands them at once: a request's end is not the next arrival's."""
    cm = cost_model()
    first, _ = one([SimSpec(0, "collocated", "n:cuda:0")], "collocated", [100, 100], [5, 5], [0.0, 30.0])
    assert first.e2el_ms < 1000
    assert first.e2el_ms == pytest.approx(cm.step_ms(0, 0, [(100, 0)]) + sum(cm.step_ms(1, 101 + k, []) for k in range(4)))


def test_a_collocated_worker_batches_decodes_and_chunks_long_prompts():
    cm = cost_model()  # max_num_batched_tokens 2048
    recs = one([SimSpec(0, "collocated", "n:cuda:0")], "collocated", [5000, 10], [3, 3], [0.0, 0.0])
    long, short = recs
    # the 5000-token prompt takes three steps (2048 + 2048 + 904); the short one rides in the third
    assert long.first_token == short.first_token and long.first_token > 0
    chunks = cm.step_ms(0, 0, [(2048, 0)]) + cm.step_ms(0, 0, [(2048, 2048)]) + \
        cm.step_ms(0, 0, [(904, 4096), (10, 0)])
    assert long.ttft_ms == pytest.approx(chunks)  # a step's tokens land at its end
    # both decode in the two steps after it, the second planned while the first runs
    assert long.e2el_ms == pytest.approx(chunks + cm.step_ms(2, 5012, []) + cm.step_ms(2, 5014, []))


def test_async_scheduling_a_prompt_rides_in_the_step_after_the_planned_one():
    """The engine plans step k + 1 while step k runs: a prompt that comes during step k waits for it and for
    k + 1, then rides in k + 2 with whatever else came before k + 2 was planned."""
    cm = cost_model()
    t0 = cm.step_ms(0, 0, [(100, 0)])  # ms: A's prefill step, then its decode steps one row each
    t1 = t0 + cm.step_ms(1, 101, [])
    arrive = (t0 + 0.5 * (t1 - t0)) / 1e3  # during A's first decode step
    a, b, c = one([SimSpec(0, "collocated", "n:cuda:0")], "collocated", [100, 100, 1500], [50, 2, 2],
                  [0.0, arrive, arrive + 1e-4])
    expected = t1 + cm.step_ms(1, 102, []) + cm.step_ms(1, 103, [(100, 0), (1500, 0)])
    assert b.first_token * 1e3 == pytest.approx(expected)
    alone = one([SimSpec(0, "collocated", "n:cuda:0")], "collocated", [100, 100], [50, 2], [0.0, arrive])[1]
    assert alone.first_token * 1e3 == pytest.approx(t1 + cm.step_ms(1, 102, []) + cm.step_ms(1, 103, [(100, 0)]))


def test_prefix_caching_a_worker_computes_a_shared_prefix_once():
    """Given the prompts' token ids, a worker that computed a prompt's leading blocks before computes only the
    rest (their attention still paid); without ids, every prompt whole."""
    cm = cost_model()
    prefix = list(range(100, 164))  # 4 blocks of 16
    prompts = [prefix + [7] * 40, prefix + [9] * 40]
    sim = Simulator(cm, [SimSpec(0, "collocated", "n:cuda:0")], "collocated", hops=NO_HOPS, block_size=16)
    a, b = sim.run([104, 104], [2, 2], [0.0, 10.0], prompts=prompts)
    assert a.ttft_ms == pytest.approx(cm.step_ms(0, 0, [(104, 0)]))
    assert b.ttft_ms == pytest.approx(cm.step_ms(0, 0, [(40, 64)])) and b.ttft_ms < a.ttft_ms
    assert sim.forecast.prefill[0].level == pytest.approx(40)  # the load forecast counts what the worker computes
    plain = one([SimSpec(0, "collocated", "n:cuda:0")], "collocated", [104, 104], [2, 2], [0.0, 10.0])[1]
    assert plain.ttft_ms == pytest.approx(a.ttft_ms)
    from pdcli.engine.block_manager import block_hash
    from pdcli.router.prefix import prompt_hashes

    chain = [block_hash(None, prompts[0][:16])]  # the engine's own keys
    for i in range(1, 6):
        chain.append(block_hash(chain[-1], prompts[0][16 * i:16 * (i + 1)]))
    assert prompt_hashes(prompts[0], 16) == chain


def test_a_plan_draws_a_rates_requests_once_and_simulates_them_as_drawn():
    """Every layout of a plan meets the same requests at a rate, drawn once as arrays (the same ids as bench's
    lists) with their block hashes: the metrics are those of the requests simulated from their token ids."""
    from pdcli.bench.arrivals import arrival_times
    from pdcli.bench.metrics import summarize
    from pdcli.bench.workloads import WORKLOADS, make_requests
    from pdcli.plan import layouts
    from pdcli.plan.search import at_rates

    for w in WORKLOADS:
        lists, arrays = make_requests(w, 40, 3, 32000, 4096), make_requests(w, 40, 3, 32000, 4096, as_arrays=True)
        assert [(r.prompt_ids, r.output_len) for r in lists] == [(r.prompt_ids.tolist(), r.output_len) for r in arrays]
    cm, slos = cost_model(), dict(ttft=300.0, tpot=25.0)
    lay = layouts.parse_layouts("2C", 2)[0]
    reqs = make_requests("shared-prefix", 60, 5, 32000, 16384)
    direct = Simulator(cm, list(lay.specs), lay.mode, block_size=16).run(
        [len(r.prompt_ids) for r in reqs], [r.output_len for r in reqs], arrival_times(60, 2.0, 1.0, 5),
        prompts=[r.prompt_ids for r in reqs])
    assert layouts.simulate(lay, cm, 2.0, "shared-prefix", 30.0, 5, slos) == summarize(direct, slos)
    assert layouts.sim_requests("shared-prefix", 60, 5, 32000, 16384, 16)[2] is not None  # prefixes shared
    assert layouts.sim_requests("random", 60, 5, 32000, 16384, 16)[2] is None  # nothing to look up
    calls = []
    rows = at_rates(layouts.parse_layouts("2C,1P1D", 2), [1.0, 2.0], lambda lay, r: calls.append((lay.name, r)) or {})
    assert calls == [("2C", 1.0), ("1P1D", 1.0), ("2C", 2.0), ("1P1D", 2.0)]  # rate by rate
    assert [(r["layout"], r["rate"]) for r in rows] == [("2C", 1.0), ("2C", 2.0), ("1P1D", 1.0), ("1P1D", 2.0)]


def test_layouts_for_n_gpus():
    names = [lay.name for lay in enumerate_layouts(4, 2)]
    assert names == ["4C", "1P3D", "2P2D", "3P1D", "adaptive-4C"]
    assert {s.device for s in enumerate_layouts(4, 2)[0].specs} == {"node0:cuda:0", "node0:cuda:1", "node1:cuda:0",
                                                                    "node1:cuda:1"}


def test_plan_and_validate_commands(tmp_path):
    from pdcli.router.fit import fit_profile, write_params
    from test_cost_model import synthetic_profile

    params = tmp_path / "params"
    params.mkdir()
    write_params(str(params), fit_profile(dict(synthetic_profile(), model="dummy:tiny-llama")))
    r = CliRunner().invoke(app, ["plan", "--params-dir", str(params), "--gpus", "2", "--arrival-rate", "1,2",
                                 "--duration", "10", "--slo-ttft-ms", "5000", "--slo-tpot-ms", "500", "--json"])
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert {x["layout"] for x in rows} == {"2C", "1P1D", "adaptive-2C"} and len(rows) == 6
    assert all(x["completed"] == x["num_prompts"] for x in rows)
    # --seeds: each rate's metrics averaged over seeds --seed .. --seed + N - 1
    base = ["plan", "--params-dir", str(params), "--gpus", "2", "--arrival-rate", "30", "--duration", "10",
            "--layouts", "adaptive-2C", "--json"]
    each = [json.loads(CliRunner().invoke(app, [*base, "--seed", str(k)]).stdout)["rows"][0] for k in (3, 4)]
    both = json.loads(CliRunner().invoke(app, [*base, "--seed", "3", "--seeds", "2"]).stdout)["rows"][0]
    assert each[0]["median_ttft_ms"] != each[1]["median_ttft_ms"]
    for key in ("median_ttft_ms", "num_prompts", "slo_attainment" if "slo_attainment" in both else "completed"):
        assert both[key] == pytest.approx((each[0][key] + each[1][key]) / 2)
    mix = {p: (each[0]["routing_mix"].get(p, 0) + each[1]["routing_mix"].get(p, 0)) / 2 for p in both["routing_mix"]}
    assert both["routing_mix"] == pytest.approx(mix)
    r = CliRunner().invoke(app, ["plan", "--params-dir", str(params), "--gpus", "2", "--arrival-rate", "0.5,40",
                                 "--find-max-rate", "--duration", "10", "--slo-tpot-ms", "500", "--layouts", "2C,1P1D",
                                 "--out", str(tmp_path / "plan")])
    assert r.exit_code == 0, r.stderr
    assert "best:" in r.stdout and (tmp_path / "plan" / "plan_goodput.png").stat().st_size > 1000
    found = json.load(open(tmp_path / "plan" / "plan.json"))["highest"]
    assert set(found) == {"2C", "1P1D"} and all(v is None or 0.5 <= v <= 40 for v in found.values())
    tight = ["plan", "--params-dir", str(params), "--gpus", "1", "--arrival-rate", "2", "--duration", "10",
             "--slo-ttft-ms", "1", "--json"]  # a TTFT SLO no prompt meets, unless it grows per prompt token
    strict = json.loads(CliRunner().invoke(app, tight).stdout)["rows"][0]["slo_attainment"]
    r = CliRunner().invoke(app, [*tight, "--slo-ttft-per-token-ms", "100"])
    assert r.exit_code == 0, r.stderr
    assert strict == 0 and json.loads(r.stdout)["rows"][0]["slo_attainment"] == 1
    one = json.loads(CliRunner().invoke(app, [*tight, "--layouts", "1C,1P1D-shared,adaptive-CP-shared"]).stdout)
    specs = {x["layout"] for x in one["rows"]}
    assert specs == {"1C", "1P1D-shared", "adaptive-CP-shared"}  # one GPU, as pdcli bench lays it out
    from pdcli.plan.layouts import enumerate_layouts

    lays = {lay.name: lay for lay in enumerate_layouts(1, 8)}
    assert [s.role for s in lays["adaptive-CP-shared"].specs] == ["collocated", "prefill"]
    assert len({s.device for s in lays["adaptive-CP-shared"].specs}) == 1
    across = json.loads(CliRunner().invoke(app, ["plan", "--params-dir", str(params), "--gpus-per-node", "1",
                                                 "--net-gbps", "100", "--layouts", "1P1D", "--arrival-rate", "1",
                                                 "--duration", "5", "--json"]).stdout)
    assert any("100.0 Gbit/s (--net-gbps)" in a for a in across["assumptions"])  # said, though the run adds "net"
    r = CliRunner().invoke(app, ["plan", "--params-dir", str(params), "--layouts", "3Q"])
    assert r.exit_code == 2 and "bad layout" in r.stderr
    run = tmp_path / "run"  # a recorded run: the simulation follows its paths
    run.mkdir()
    reqs = [dict(arrival=i * 0.5, input_len=200, output_len=20, ttft_ms=30.0, e2el_ms=300.0, path="collocated")
            for i in range(20)]
    json.dump(dict(mode="collocated", request_rate=2.0, layout=[dict(rank=0, role="collocated", device="cuda:0")],
                   median_ttft_ms=30.0, median_tpot_ms=14.2, slo_attainment=1.0, goodput_slos=dict(ttft=5000),
                   requests=reqs), open(run / "r.json", "w"))
    r = CliRunner().invoke(app, ["plan", "--params-dir", str(params), "--validate", str(run), "--json"])
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["rows"][0]["median_ttft_ms_measured"] == 30.0 and out["rows"][0]["median_ttft_ms_sim"] > 0
    assert out["summary"]["runs"] == 1


def test_validate_leaves_out_the_warmup_as_the_measurement_does():
    """A recorded run's measured metrics leave out its first num_warmup_excluded arrivals; the simulated ones the
    same (counted in, the simulated attainment of the H200 runs came out 1-2 points high)."""
    from pdcli.plan.validate import simulate_run
    from pdcli.router.replay import Record, Run
    from test_cost_model import _fitted, synthetic_profile

    cm = _fitted(synthetic_profile())
    recs = [Record(i * 0.1, 200, 20, 30.0, 300.0, "collocated") for i in range(30)]
    run = Run("r.json", "collocated", 10.0, [dict(rank=0, role="collocated", device="cuda:0")], False, recs,
              dict(ttft=5000))
    assert simulate_run(run, cm)["num_prompts"] == 30
    assert simulate_run(run, cm, warmup_excluded=12)["num_prompts"] == 18


def test_validate_rebuilds_a_shared_prefix_runs_prompts_for_the_prefix_cache():
    """A recorded shared-prefix run keeps lengths, not tokens: validation rebuilds its prompts from bench's
    generator (seed, rate, the model's vocabulary) where the lengths agree, so the simulator finds the system
    prompts in its prefix cache (simulated whole, the H100 run's were 135 ms TPOT against 9 measured)."""
    from pdcli.bench.runner import prompt_seed
    from pdcli.bench.workloads import make_requests
    from pdcli.plan.validate import rebuilt_hashes, simulate_run
    from pdcli.router.replay import Record, Run
    from test_cost_model import _fitted, synthetic_profile

    reqs = make_requests("shared-prefix", 40, prompt_seed(3, 10.0), 128256, 1 << 20)
    recs = [Record(i * 0.1, len(r.prompt_ids), r.output_len, 30.0, 300.0, "collocated") for i, r in enumerate(reqs)]
    run = Run("r.json", "collocated", 10.0, [dict(rank=0, role="collocated", device="cuda:0")], False, recs,
              dict(ttft=5000))
    d = dict(workload="shared-prefix", seed=3, model="dummy:llama3-8b")
    hashes = rebuilt_hashes(run, d)
    assert hashes is not None and len(hashes) == 40 and hashes[0][:8] in [h[:8] for h in hashes[1:]]
    assert rebuilt_hashes(run, dict(d, seed=4)) is None  # other prompts: lengths differ
    assert rebuilt_hashes(run, dict(d, workload="mixed")) is None
    cm = _fitted(synthetic_profile())
    assert simulate_run(run, cm, hashes=hashes)["median_ttft_ms"] < simulate_run(run, cm)["median_ttft_ms"]


@pytest.mark.parametrize("mode", ["disaggregated", "collocated"])
def test_the_routers_ttft_is_the_simulated_one_for_the_typical_prompt(mode):
    """The router's TTFT law (router/latency.py) against the engine's rules with the cost model exact: 1024-token
    prompts at 36 req/s on one H100's fitted profile, whose prefill worker's steps hold 1-5 prompts each (those
    that arrive before a step starts join it). The median prompt's predicted TTFT is the simulated one (without
    the joining prompts the prefill worker's was 8-20% off); the coordinator's hops, which the router leaves out,
    left out here too."""
    import statistics
    from pathlib import Path

    from pdcli.bench.arrivals import arrival_times
    from pdcli.router.adaptive import AdaptiveRouter
    from pdcli.router.fit import load_cost_model

    cm = load_cost_model(str(Path(__file__).parent.parent / "profiles/nvidia-h100-80gb-hbm3/dummy-llama3-8b"))
    rate = 36.0 if mode == "disaggregated" else 16.0
    predicted = {}

    class Priced(Simulator):
        def _on_arrive(self, seq):
            loads = self.loads()
            super()._on_arrive(seq)
            pre, dec = loads[seq.workers[0]], loads[seq.workers[-1]]
            predicted[seq.index] = self.router.price(seq.path, seq.prompt_len, seq.output_len, pre, dec, "gpu-nccl")[0]

    specs = [SimSpec(0, "prefill", "n:cuda:0"), SimSpec(1, "decode", "n:cuda:1")] if mode == "disaggregated" else \
        [SimSpec(0, "collocated", "n:cuda:0")]
    n = int(rate * 30)
    recs = Priced(cm, specs, mode, router=AdaptiveRouter(cm), hops=NO_HOPS).run([1024] * n, [128] * n, arrival_times(n, rate, 1.0, 2))
    errs = [abs(predicted[i]["ttft_ms"] / r.ttft_ms - 1) for i, r in enumerate(recs) if r.arrival > 5]
    assert statistics.median(errs) < 0.02


def test_the_simulators_running_sums_are_its_queues():
    """Each worker's queued prompt tokens and squared lengths, kept as running sums, equal the sums over the
    prompts it holds at every arrival (chunked long prompts, several workers)."""
    import numpy as np

    checked = []

    class Checked(Simulator):
        def _on_arrive(self, seq):
            for w in self.workers:
                done = [min(s.reported, s.prompt_len - 1) for s in w.prompts]
                assert w.queued_tokens == sum(s.prompt_len - d for s, d in zip(w.prompts, done))
                assert w.queued_sq == sum(s.prompt_len ** 2 - d ** 2 for s, d in zip(w.prompts, done))
                assert [s.arrival for s in w.prompts] == sorted(s.arrival for s in w.prompts)
            checked.append(sum(len(w.prompts) for w in self.workers))
            super()._on_arrive(seq)

    rng = np.random.default_rng(0)
    n = 200
    lens = [int(x) for x in rng.choice([100, 3000, 7000], size=n)]
    specs = [SimSpec(0, "collocated", "n:cuda:0"), SimSpec(1, "prefill", "n:cuda:1"), SimSpec(2, "decode", "n:cuda:2")]
    recs = Checked(cost_model(), specs, "threshold").run(lens, [20] * n, np.cumsum(rng.exponential(0.02, n)))
    assert all(r.end is not None for r in recs) and max(checked) > 3  # queues formed


def test_a_highest_rate_is_compared_only_where_the_run_brackets_it():
    """A layout's measured highest rate with >= 90% attainment is known only if the run has a rate above it: at
    the top of its rates it is a lower bound, with none at >= 90% it lies below them. Such layouts' rows count for
    the p50 errors; their highest rates are listed apart and enter neither the rate error nor the ordering."""
    from pdcli.plan.validate import summarize_validation

    def row(run, mode, rate, meas, sim):
        return dict(run=run, mode=mode, rate=rate, slo_attainment_measured=meas, slo_attainment_sim=sim,
                    median_ttft_ms_sim=20.0, median_ttft_ms_measured=25.0, median_tpot_ms_sim=8.0,
                    median_tpot_ms_measured=8.0)

    rows = [row("a", "collocated", 4.0, 0.95, 0.95), row("a", "collocated", 6.0, 0.80, 0.95),  # known: 4.0
            row("a", "disaggregated", 4.0, 0.99, 0.99), row("a", "disaggregated", 6.0, 0.95, 0.5),  # >= 6.0
            row("a", "adaptive", 4.0, 0.80, 0.95), row("a", "adaptive", 6.0, 0.70, 0.5)]  # below 4.0
    s = summarize_validation(rows)
    assert s["highest_rates"] == {"a collocated": dict(measured=4.0, predicted=6.0)}
    assert s["highest_rates_not_bracketed"] == {"a disaggregated": dict(measured_at_least=6.0, predicted=4.0),
                                                "a adaptive": dict(measured_at_least=None, predicted=4.0)}
    assert s["highest_rate_err_max"] == pytest.approx(0.5) and s["order_pairs"] == 0
    assert s["rows_below_saturation"] == 3 and s["ttft_p50_err_median"] == pytest.approx(0.2)


def test_a_step_that_samples_nothing_is_not_reported_until_one_that_does():
    """As the engine's workers report since 2026-12-05: a step that only prefills part of a prompt sends no
    message, so the simulated coordinator keeps its tokens queued and its last step's end where it was; the
    step that samples (the prompt's last chunk, or decode rows) reports every progress before it."""
    from pdcli.plan.sim import SimSeq, SimWorker

    w = SimWorker(SimSpec(1, "prefill", "n:cuda:1"), cost_model(), max_num_seqs=8, max_num_batched_tokens=4096)
    seq = SimSeq(0, 0.0, 10_000, 4)
    w.waiting.append(seq)
    w.hold(seq)
    assert w.queued_tokens == 10_000
    w.finish_step(w.plan(), 0.2)  # 4096 tokens, nothing sampled
    assert seq.prefilled == 4096 and w.queued_tokens == 10_000 and w.last_step_end is None
    w.finish_step(w.plan(), 0.4)  # 8192
    assert w.queued_tokens == 10_000 and w.last_step_end is None
    prefilled, _ = w.finish_step(w.plan(), 0.5)  # the last chunk: its first token, and the message
    assert prefilled == [seq] and w.queued_tokens == 0 and w.queued_sq == 0 and w.last_step_end == 0.5
    two = [SimSeq(i, 0.0, 3000, 4) for i in (1, 2)]  # on a collocated worker a step with decode rows reports
    c = SimWorker(SimSpec(0, "collocated", "n:cuda:0"), cost_model(), max_num_seqs=8, max_num_batched_tokens=4096)
    for s in two:
        c.waiting.append(s)
        c.hold(s)
    c.finish_step(c.plan(), 0.1)  # the first prompt whole, 1096 of the second: a first token, so a message
    assert c.queued_tokens == 3000 - 1096 and c.last_step_end == 0.1


def test_a_closed_loop_sends_a_request_when_one_ends_and_times_it_from_then():
    """max_concurrency (bench's, vLLM's): with one slot, the second request waits for the first to end, and
    its TTFT starts when it is sent, as bench times it; without the cap both are in flight at once."""
    spec = [SimSpec(0, "collocated", "n:cuda:0")]
    a, b = one(spec, "collocated", [100, 100], [5, 5], [0.0, 0.0])
    assert a.arrival == b.arrival == 0.0 and b.first_token < a.end  # both in flight at once
    sim = Simulator(cost_model(), spec, "collocated", hops=NO_HOPS)
    first, second = sim.run([100, 100], [5, 5], [0.0, 0.0], max_concurrency=1)
    assert second.arrival == pytest.approx(first.end) and second.ttft_ms == pytest.approx(first.ttft_ms)
    assert second.e2el_ms == pytest.approx(first.e2el_ms)  # the same work on an idle worker


def test_validate_rebuilds_a_closed_loop_run_without_records(tmp_path):
    """A `--arrival-rate inf --max-concurrency N` result from before --save-detailed: its requests from bench's
    generator when their lengths add up to the recorded totals (totals that differ are left out, with the reason);
    workers time-sliced on one GPU (--no-mps) step without the sharing MPS measured: a decode step waits for the
    neighbour's prefill."""
    from pdcli.bench.workloads import make_requests
    from pdcli.plan.validate import rebuilt_closed_loop, summarize_validation, validate_runs

    reqs = make_requests("random", 8, 0, 32000, 1 << 20)
    d = dict(mode="collocated", request_rate="inf", max_concurrency=4, workload="random", num_prompts=8, seed=0,
             total_input_tokens=sum(len(r.prompt_ids) for r in reqs), total_output_tokens=sum(r.output_len for r in reqs),
             layout=[dict(rank=0, role="collocated", device="cuda:0")], median_ttft_ms=900.0, median_tpot_ms=20.0,
             request_throughput=2.0, slo_attainment=None)
    run = rebuilt_closed_loop("f.json", d)
    assert run.max_concurrency == 4 and [(r.input_len, r.output_len) for r in run.records] == [(1024, 128)] * 8
    assert "totals differ" in rebuilt_closed_loop("f.json", dict(d, total_input_tokens=1))
    two = [dict(rank=0, role="prefill", device="cuda:0"), dict(rank=1, role="decode", device="cuda:0")]
    pair = dict(d, mode="disaggregated", layout=two, num_prompts=8)
    sliced = rebuilt_closed_loop("f.json", dict(pair, mps=False))
    shared = rebuilt_closed_loop("f.json", dict(pair, mps=True))
    assert sliced.time_sliced and not shared.time_sliced and not run.time_sliced
    from dataclasses import replace

    from pdcli.plan.validate import simulate_records
    cm = replace(cost_model(), sharing=dict(decode_beside_decode=1.5, prefill_beside_decode=1.3,
                                            decode_beside_prefill=1.2, prefill_beside_prefill=1.8))
    as_sliced = [r.e2el_ms for r in simulate_records(sliced, cm)]
    assert as_sliced == [r.e2el_ms for r in simulate_records(shared, replace(cm, sharing={}))]
    assert as_sliced != [r.e2el_ms for r in simulate_records(shared, cm)]  # MPS's measured sharing is not used
    (tmp_path / "20261126-000000_collocated_random_rateinf.json").write_text(json.dumps(d))
    [row] = validate_runs(str(tmp_path), cost_model())
    assert row["max_concurrency"] == 4 and row["request_throughput_sim"] > 0
    s = summarize_validation([row])
    assert s["rows_below_saturation"] == 0 and s["highest_rates_not_bracketed"] == {}
    [c] = s["closed_loop"]
    assert c["throughput_err"] == pytest.approx(abs(row["request_throughput_sim"] - 2.0) / 2.0)


def test_sim_residuals_ttft_sets_each_request_against_its_simulated_self():
    """`sim_residuals --ttft`: measured over simulated TTFT per request after the 5 s warm-up, short and long
    prompts apart."""
    from pdcli.benchmarks.sim_residuals import ttft_residuals
    from pdcli.plan.validate import simulate_records
    from pdcli.router.replay import Record, Run

    layout = [dict(rank=0, role="prefill", device="cuda:0"), dict(rank=1, role="decode", device="cuda:0")]
    lens = [(256, 8), (4000, 4), (256, 8), (256, 8)]
    recs = [Record(5.0 + 2 * i, n, o, None, None, "disaggregated") for i, (n, o) in enumerate(lens)]
    run = Run("f", "disaggregated", 0.5, layout, False, [Record(1.0, 256, 8, None, None, "disaggregated"), *recs])
    sim = simulate_records(run, cost_model())
    scale = [1.0, 1.5, 1.2, 1.1, 1.3]  # the first is in the warm-up
    run.records = [Record(r.arrival, r.input_len, r.output_len, s.ttft_ms * k, s.e2el_ms * k, r.path)
                   for r, s, k in zip(run.records, sim, scale)]
    got = ttft_residuals(run, cost_model())["measured_over_simulated"]
    assert got["long"]["requests"] == 1 and got["long"]["median"] == pytest.approx(1.2)
    assert got["short"]["requests"] == 3 and got["short"]["median"] == pytest.approx(1.3)
