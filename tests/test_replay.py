"""pdcli replay: a saved run's decisions re-predicted from the state the router recorded (or rebuilt)."""
import glob
import json

import pytest
from typer.testing import CliRunner

from pdcli.cli import app
from pdcli.router.load import EventRate, LoadForecast, WorkerLoad, compact
from pdcli.router.replay import Record, Run, assign_workers, load_runs, rebuilt_loads


def test_event_rate_learns_a_steady_rate_and_forgets_it():
    r = EventRate(tau=10.0)
    for i in range(401):  # 4 events/s for 100 s
        r.add(i * 0.25)
    assert r.at(100.0) == pytest.approx(4.0, rel=0.02)
    early = EventRate(tau=10.0)
    for i in range(9):  # the first 2 s: no start-up bias
        early.add(i * 0.25)
    assert early.at(2.0) == pytest.approx(4.0, rel=0.1)
    assert r.at(150.0) < 0.05 * 4.0  # 5 tau without events


def test_compact_records_round_trip():
    w = WorkerLoad(decode_batch=7, decode_ctx=9000, role="decode", prefill_per_s=3.14159265, device="cuda:0")
    c = compact(w)
    assert "queued_prefill_tokens" not in c and c["prefill_per_s"] == 3.142
    assert WorkerLoad(**json.loads(json.dumps(c))).decode_batch == 7


def test_rebuilt_state_follows_the_records():
    """Older runs recorded no worker loads: a request is queued on its worker until its first token and decodes
    until its end; the forecast counts what was routed before."""
    recs = [Record(0.0, 100, 10, 20.0, 200.0, "collocated"), Record(0.1, 300, 10, 30.0, 500.0, "collocated"),
            Record(0.11, 50, 5, 10.0, 50.0, "collocated"), Record(0.15, 10, 5, 5.0, 20.0, "collocated")]
    run = Run("x", "collocated", 10.0, [dict(rank=0, role="collocated", device="cuda:0"),
                                        dict(rank=1, role="collocated", device="cuda:1")], False, recs)
    assign_workers(run)
    assert [r.workers for r in recs] == [(0,), (1,), (0,), (1,)]  # fewest in flight (at 0.15 s: 2 on rank 0)
    forecast = LoadForecast()
    for i, r in enumerate(recs[:3]):
        forecast.route(r.arrival, r.workers[0], r.workers[-1], r.input_len, r.output_len)
    loads = rebuilt_loads(run, 3, forecast)
    # at 0.15 s rank 0 decodes requests 0 and 2 (first tokens at 0.02 and 0.12 s), rank 1 request 1 (0.13 s)
    assert loads[0].decode_batch == 2 and loads[1].decode_batch == 1
    assert loads[0].queued_prefill_tokens == 0 and not loads[0].steps_seen
    assert loads[0].prefill_per_s > 0 and loads[0].gpu_prefill_per_s == loads[0].prefill_per_s


def test_an_adaptive_runs_workers_are_assigned_as_its_router_chose_them():
    """Older adaptive runs recorded no workers: their router took the worker with the least queued prompt tokens
    plus sequences decoding, not the fewest requests in flight."""
    coll = [dict(rank=0, role="collocated", device="cuda:0"), dict(rank=1, role="collocated", device="cuda:1")]
    recs = [Record(0.0, 1000, 10, 500.0, 900.0, "collocated", workers=(0,)),  # still prefilling at 0.1 s
            Record(0.0, 10, 10, 10.0, 900.0, "collocated", workers=(1,)),
            Record(0.0, 10, 10, 20.0, 900.0, "collocated", workers=(1,)),
            Record(0.1, 10, 10, 10.0, 100.0, "collocated")]
    assign_workers(Run("x", "collocated", 10.0, coll, True, recs))
    assert recs[3].workers == (0,)  # one in flight there against two
    recs[3].workers = ()
    assign_workers(Run("x", "adaptive", 10.0, coll, True, recs))
    assert recs[3].workers == (1,)  # 1000 queued prompt tokens there against two decoding


def test_rebuilt_prefill_worker_steps_end_with_their_first_tokens():
    """A prefill worker's step ends with the first tokens of the prompts it held: the rebuild recovers when its last
    step ended and which queued prompts came after it, as the worker's step reports told the router."""
    from test_cost_model import cost_model

    recs = [Record(0.0, 100, 10, 50.0, 500.0, "disaggregated"), Record(0.01, 100, 10, 40.0, 500.0, "disaggregated"),
            Record(0.06, 300, 10, 40.0, 500.0, "disaggregated"), Record(0.07, 10, 5, 40.0, 100.0, "disaggregated")]
    run = Run("x", "disaggregated", 10.0, [dict(rank=0, role="prefill", device="cuda:0"),
                                           dict(rank=1, role="decode", device="cuda:1")], False, recs)
    assign_workers(run)
    loads = rebuilt_loads(run, 3, LoadForecast(), cost_model())
    # the 0.05 s step held A and B; C came to an idle worker at 0.06 s and began a step of its own
    assert loads[0].steps_seen and loads[0].since_step_ms == pytest.approx(10.0)
    assert loads[0].queued_prefill_tokens == 300 and loads[0].queued_since_step_tokens == 0
    assert loads[1].decode_batch == 2
    recs[2].arrival = 0.04  # C came while that step ran: it waits for the next
    run.step_ends = None
    loads = rebuilt_loads(run, 3, LoadForecast(), cost_model())
    assert loads[0].since_step_ms == pytest.approx(20.0) and loads[0].queued_since_step_tokens == 0


@pytest.mark.slow
def test_replay_reproduces_the_recorded_decisions(tmp_path):
    """An adaptive run on CPU with a fitted model and --save-detailed: replaying it from the recorded loads
    predicts what the router predicted when it decided."""
    from pdcli.router.fit import fit_profile, write_params
    from test_cost_model import synthetic_profile

    params = tmp_path / "params"
    params.mkdir()
    write_params(str(params), fit_profile(dict(synthetic_profile(), model="dummy:tiny-llama")))
    out = tmp_path / "run"
    bench = ["bench", "--model", "dummy:tiny-llama", "--mode", "adaptive", "--devices", "cpu,cpu", "--arrival-rate", "8",
             "--num-prompts", "24", "--random-input-len", "64", "--random-output-len", "8", "--save-detailed",
             "--params-dir", str(params), "--result-dir", str(out), "--num-kv-blocks", "512", "--block-size", "8"]
    r = CliRunner().invoke(app, bench)
    assert r.exit_code == 0, r.stderr
    recorded = json.load(open(glob.glob(str(out / "*.json"))[0]))["requests"]
    assert all(q["decision"]["loads"] for q in recorded)
    from pdcli.router.adaptive import AdaptiveRouter
    from pdcli.router.fit import load_cost_model
    from pdcli.router.replay import replay_run

    run = load_runs(str(out))[0]
    replayed = replay_run(run, AdaptiveRouter(load_cost_model(str(params))))
    by_arrival = {q["arrival"]: q for q in recorded}
    same = [x for x in replayed if x.raw["tpot_ms"] == pytest.approx(
        by_arrival[x.record.arrival]["decision"]["predicted_raw"][x.record.path]["tpot_ms"], rel=0.01)]
    assert len(same) >= 0.8 * len(replayed)  # the output-length predictor learns in a slightly different order
    (out / "replay.json").write_text("")  # `pdcli replay RUN --json > RUN/replay.json` creates it before reading
    assert len(load_runs(str(out))) == 1
    cut = dict(json.load(open(glob.glob(str(out / "2*.json"))[0])), interrupted=True)
    (out / "20991231-000000_adaptive_random_rate9.0.json").write_text(json.dumps(cut))
    assert len(load_runs(str(out))) == 1  # an interrupted run's records are a cut sample
    (out / "20991231-000000_adaptive_random_rate9.0.json").unlink()
    r = CliRunner().invoke(app, ["replay", str(out), "--params-dir", str(params), "--json"])
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)
    assert rows and rows[0]["state"] == "recorded" and "ttft_err" in rows[0]
    # kept gzipped (a committed run), it reads the same, and a resumed sweep counts it as done
    from pdcli.bench import result_files

    result_files.main([str(out)])  # gzips the run, leaves replay.json
    assert len(glob.glob(str(out / "2*.json.gz"))) == 1 and not glob.glob(str(out / "2*.json"))
    assert (out / "replay.json").exists()
    assert load_runs(str(out))[0].records == run.records
    r = CliRunner().invoke(app, bench + ["--resume"])
    assert r.exit_code == 0 and "done already" in r.stderr, r.stderr
    assert len(result_files.find(str(out), "2*")) == 1


def test_prefix_index_knows_what_a_worker_has_seen():
    from pdcli.router.prefix import PrefixIndex, prompt_hashes

    system = list(range(100, 164))  # 4 blocks of 16
    a, b, other = system + [1, 2, 3], system + [7] * 40, list(range(500, 600))
    index = PrefixIndex(16, {0: 8, 1: 8})
    index.add(0, prompt_hashes(a, 16))
    assert index.cached_tokens(0, prompt_hashes(b, 16)) == 64  # the shared system prompt
    assert index.cached_tokens(1, prompt_hashes(b, 16)) == 0 and index.cached_tokens(0, prompt_hashes(other, 16)) == 0
    assert index.cached_tokens(0, prompt_hashes(system, 16)) == 63  # the last token is always computed
    index.add(0, prompt_hashes(other, 16))  # 6 more blocks: the pool holds 8, the oldest leave
    assert index.cached_tokens(0, prompt_hashes(b, 16)) == 0


def test_a_cached_prefix_prices_only_the_rest():
    from test_cost_model import load, router

    r = router()
    cold = r.predict(4000, 100, load(4), load(0), load(4))
    warm = r.predict(4000, 100, load(4), load(0), load(4), cached=dict(collocated=3968))
    assert warm["collocated"]["ttft_ms"] < 0.2 * cold["collocated"]["ttft_ms"]
    assert warm["disaggregated"] == cold["disaggregated"]


@pytest.mark.slow
@pytest.mark.parametrize("mode,devices", [("collocated", "cpu"), ("disaggregated", "cpu,cpu")])
def test_a_static_policy_s_decisions_are_priced_and_recorded_too(tmp_path, mode, devices):
    """With a fitted model loaded, a static mode's run records, per request, the loads its policy saw and the
    router's predictions for the path taken, as adaptive's does: replays start from the recorded state and the
    result carries the router's online errors."""
    from pdcli.router.fit import fit_profile, write_params
    from test_cost_model import synthetic_profile

    params = tmp_path / "params"
    params.mkdir()
    write_params(str(params), fit_profile(dict(synthetic_profile(), model="dummy:tiny-llama")))
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["bench", "--model", "dummy:tiny-llama", "--mode", mode, "--devices", devices,
                                 "--arrival-rate", "8", "--num-prompts", "12", "--random-input-len", "64",
                                 "--random-output-len", "8", "--save-detailed", "--params-dir", str(params),
                                 "--result-dir", str(out), "--num-kv-blocks", "512", "--block-size", "8"])
    assert r.exit_code == 0, r.stderr
    d = json.load(open(glob.glob(str(out / "*.json"))[0]))
    assert all(q["path"] == mode and q["decision"]["loads"] and q["decision"]["predicted_raw"][mode]["tpot_ms"] > 0
               for q in d["requests"])
    assert d["router_ttft_median_abs_rel_err"] >= 0 and d["router_tpot_median_abs_rel_err"] >= 0
    r = CliRunner().invoke(app, ["replay", str(out), "--params-dir", str(params), "--json"])
    assert r.exit_code == 0, r.stderr
    assert {row["state"] for row in json.loads(r.stdout)} == {"recorded"}


def test_state_fit_scores_each_predictor_on_the_held_out_half():
    """benchmarks/state_fit: a outcome the state explains is fitted (linear and nearest near exact), a constant
    is not; the router's predictions are scored on the same held-out half."""
    import numpy as np

    from pdcli.benchmarks.state_fit import fits

    rng = np.random.default_rng(0)
    x = rng.uniform(1, 10, (400, 2))
    y = 10 + 3 * x[:, 0] + 0.01 * rng.standard_normal(400)
    r = fits(x, raw=np.full(400, 20.0), cal=y * 1.1, y=y)
    assert r["requests"] == 200
    assert r["linear"] < 0.01 and r["nearest"] < 0.1 < r["constant"]
    assert abs(r["router"] - 0.1) < 1e-6


def test_a_replay_of_loads_recorded_before_shared_hits_counted_takes_them_off_the_context():
    """Runs recorded before the loads counted prefix-cache hits shared in a decode batch (load.shared_discount):
    replay takes each decoding request's discount off its worker's recorded context, on a copy; runs that
    recorded it are replayed as recorded."""
    from pdcli.router.load import shared_discount
    from pdcli.router.replay import _shared_decoding, _with_shared

    def cut(cached):
        return shared_discount(cached, 0.5)

    lay = [dict(rank=0, role="collocated", device="cuda:0")]
    recs = [Record(0.0, 2300, 10, 50.0, 1000.0, "collocated", (0,), {0: WorkerLoad()}),
            Record(0.1, 2300, 10, 50.0, 1000.0, "collocated", (0,), {0: WorkerLoad(decode_batch=1, decode_ctx=2301)},
                   cached={"collocated": 2048}),
            Record(0.5, 300, 10, 50.0, 1000.0, "collocated", (0,), {0: WorkerLoad(decode_batch=2, decode_ctx=4700)})]
    run = Run("r.json", "collocated", 2.0, lay, False, recs)
    shared = _shared_decoding(run, 0.5)
    assert shared is not None
    got = _with_shared(recs[2].loads, shared, 0.5)[0]
    assert got.decode_shared_ctx == cut(2048) == 1024 and got.decode_ctx == 4700 - 1024
    assert recs[2].loads[0].decode_ctx == 4700  # the record itself is left as it was
    assert _with_shared(recs[1].loads, shared, 0.1)[0].decode_ctx == 2301  # its own first token came at 0.15 s
    recs[2].loads[0].decode_shared_ctx = 100  # a run that recorded the discount
    assert _shared_decoding(run, 0.5) is None


def test_the_simulator_counts_a_collocated_hit_shared_in_its_decode_steps():
    from pdcli.plan.sim import SimSeq, SimSpec, SimWorker
    from pdcli.router.load import shared_discount
    from test_cost_model import cost_model

    cm = cost_model()
    w = SimWorker(SimSpec(0, "collocated", "n:cuda:0"), cm, 256, 8192)
    hit, miss = SimSeq(0, 0.0, 2300, 10, workers=(0,), cached=2048), SimSeq(1, 0.0, 2300, 10, workers=(0, 1), cached=2048)
    w.admit(hit)
    cut = shared_discount(2048, cm.shared_context_read)
    assert cut > 0 and w.decode_ctx == 2301 - cut
    w.admit(miss)  # handed off: its blocks came by transfer, shared with no one
    assert w.decode_ctx == 2 * 2301 - cut
