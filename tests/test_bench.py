"""pdcli bench / plot on CPU: arrival process, metric functions on a hand-computed trace, a short run."""
import glob
import json
import math
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from pdcli.bench.arrivals import arrival_times
from pdcli.bench.metrics import RequestRecord, max_rate_meeting, summarize
from pdcli.bench.runner import layout_for
from pdcli.coordinator.routing import can_hand_off
from pdcli.workers.layout import collocated_only, parse_layout, pd_on_collocated
from pdcli.bench.workloads import make_requests
from pdcli.cli import app
from pdcli.config import CacheConfig


@pytest.mark.parametrize("burstiness, cv", [(1.0, 1.0), (4.0, 0.5), (0.25, 2.0)])
def test_arrivals_mean_rate_and_cv(burstiness, cv):
    t = arrival_times(20000, rate=5.0, burstiness=burstiness, seed=1)
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)
    assert np.array_equal(t, arrival_times(20000, 5.0, burstiness, seed=1))  # seeded
    assert not np.array_equal(t, arrival_times(20000, 5.0, burstiness, seed=2))


def test_infinite_rate_sends_everything_at_once():
    assert arrival_times(7, math.inf).tolist() == [0.0] * 7


def test_metrics_on_a_hand_computed_trace():
    recs = [
        RequestRecord(arrival=0.0, input_len=10, output_len=3, first_token=0.1, token_times=[0.1, 0.2, 0.4], end=0.4),
        RequestRecord(arrival=1.0, input_len=20, output_len=2, first_token=1.3, token_times=[1.3, 1.5], end=1.5),
        RequestRecord(arrival=2.0, input_len=30, error="worker died"),
        RequestRecord(arrival=2.5, input_len=40, aborted=True, error="timeout"),
    ]
    s = summarize(recs, {"ttft": 200, "tpot": 160})
    assert (s["completed"], s["failed"], s["aborted"], s["num_prompts"]) == (2, 1, 1, 4)
    assert s["duration"] == pytest.approx(1.5)
    assert s["mean_ttft_ms"] == pytest.approx(200)  # (100 + 300) / 2
    assert s["median_tpot_ms"] == pytest.approx(175)  # request 1: (400 - 100) / 2 = 150; request 2: 200 / 1 = 200
    assert s["mean_itl_ms"] == pytest.approx((100 + 200 + 200) / 3)
    assert s["mean_e2el_ms"] == pytest.approx((400 + 500) / 2)
    assert s["request_throughput"] == pytest.approx(2 / 1.5)
    assert s["output_throughput"] == pytest.approx(5 / 1.5)
    assert s["total_token_throughput"] == pytest.approx(35 / 1.5)
    # only request 1 meets both SLOs; failed and aborted requests count against attainment
    assert s["slo_attainment"] == pytest.approx(1 / 4)
    assert s["request_goodput"] == pytest.approx(1 / 1.5)
    rows = [dict(request_rate=1.0, slo_attainment=0.95), dict(request_rate=2.0, slo_attainment=0.92),
            dict(request_rate=4.0, slo_attainment=0.5), dict(request_rate="inf", slo_attainment=1.0)]
    assert max_rate_meeting(rows) == 2.0


def test_workloads_follow_their_definitions():
    short = make_requests("short", 200, 0, 1000, 4096)
    assert all(64 <= len(r.prompt_ids) <= 256 and r.output_len == 128 for r in short)
    long = make_requests("long", 200, 0, 1000, 4096)
    assert all(1024 <= len(r.prompt_ids) <= 2048 for r in long)
    rnd = make_requests("random", 200, 0, 1000, 4096, input_len=100, output_len=50, range_ratio=0.5)
    assert {len(r.prompt_ids) for r in rnd} <= set(range(50, 151)) and len({len(r.prompt_ids) for r in rnd}) > 20
    assert all(max(r.prompt_ids) < 1000 for r in rnd)
    with pytest.raises(ValueError, match="unknown workload"):
        make_requests("huge", 1, 0, 1000, 4096)


def test_each_rate_of_a_sweep_gets_prompts_of_its_own():
    """The workers keep their prefix cache from one rate to the next: the same prompts at every rate made
    the first requests of each later rate cache hits. A rate's prompts do not depend on the other rates of
    the list (a sweep split or resumed runs each mode on another list)."""
    from pdcli.bench.runner import prompt_seed

    rates = [make_requests("random", 50, prompt_seed(3, r), 32000, 4096, input_len=64, output_len=8) for r in (4, 4.5, 8)]
    firsts = [{tuple(r.prompt_ids[:16]) for r in reqs} for reqs in rates]
    assert not (firsts[0] & firsts[1]) and not (firsts[1] & firsts[2]) and not (firsts[0] & firsts[2])
    again = make_requests("random", 50, prompt_seed(3, 4.5), 32000, 4096, input_len=64, output_len=8)
    assert [r.prompt_ids for r in again] == [r.prompt_ids for r in rates[1]]  # every mode gets the same ones


def test_modes_get_the_same_devices():
    devs = ["cuda:0", "cuda:1"]
    for mode in ("collocated", "disaggregated", "adaptive"):
        assert {s.device for s in layout_for(mode, devs)} == set(devs)
    # the router's modes share no GPU between two processes: collocated workers prefill/decode for each other
    assert [(s.role, s.device) for s in layout_for("adaptive", devs)] == [("collocated", d) for d in devs]
    assert collocated_only(layout_for("adaptive", devs), "adaptive")
    assert not collocated_only(layout_for("collocated", devs), "collocated")
    assert not collocated_only(layout_for("adaptive", devs[:1]), "adaptive")
    # one GPU: a collocated and a prefill worker that hands the KV back to it, one decode batch on the GPU
    one = layout_for("adaptive", devs[:1])
    assert [(s.role, s.device) for s in one] == [("collocated", "cuda:0"), ("prefill", "cuda:0")]
    assert pd_on_collocated(one, "adaptive") and pd_on_collocated(one, "threshold")
    assert not pd_on_collocated(one, "collocated")
    cpd = parse_layout("cuda:0", "cuda:0", "cuda:0")  # with a decode worker beside them, P hands to it only
    assert not pd_on_collocated(cpd, "adaptive")
    assert can_hand_off(one[1], one[0], True) and not can_hand_off(cpd[1], cpd[0], False)
    assert not can_hand_off(one[0], one[1], True)  # a prefill worker decodes nothing
    three = ["cuda:0", "cuda:1", "cuda:2"]  # DistServe's miniature: 2 prefill + 1 decode
    assert [(s.role, s.device) for s in layout_for("disaggregated", three, 2)] == \
        [("prefill", "cuda:0"), ("prefill", "cuda:1"), ("decode", "cuda:2")]
    assert [s.role for s in layout_for("disaggregated", three)] == ["prefill", "decode", "decode"]
    for bad in (0, 3):
        with pytest.raises(ValueError, match="num-prefill"):
            layout_for("disaggregated", three, bad)


def test_bench_runs_and_plot_makes_pngs(tmp_path):
    out = str(tmp_path / "res")
    args = ["bench", "--model", "dummy:tiny-llama", "--mode", "all", "--devices", "cpu,cpu", "--arrival-rate", "0.3",
            "--workload", "long", "--num-prompts", "3", "--result-dir", out, "--slo-ttft-ms", "5000",
            "--slo-tpot-ms", "500", "--save-detailed", "--max-model-len", "4096", "--num-kv-blocks", "1024",
            "--max-num-batched-tokens", "512"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.stderr
    files = sorted(glob.glob(os.path.join(out, "*.json")))
    assert len(files) == 4
    for f in files:
        d = json.load(open(f))
        for key in ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms",
                    "p99_e2el_ms", "request_throughput", "output_throughput", "total_token_throughput", "completed",
                    "failed", "aborted", "slo_attainment", "request_goodput", "routing_mix", "layout", "provenance",
                    "request_rate", "kernel_path", "requests"):
            assert key in d, key
        assert d["request_rate"] == 0.3 and d["completed"] == 3 and d["failed"] == 0
        assert {x["device"] for x in d["layout"]} == {"cpu"}
        assert all(x["num_kv_blocks"] == 1024 and x["kv_capacity_tokens"] == 1024 * CacheConfig().block_size
                   for x in d["layout"])
        assert d["mps"] is False  # CPU workers never run under MPS
        ranks = {x["rank"]: x["role"] for x in d["layout"]}
        for q in d["requests"]:  # the workers that ran each request: one collocated, or a prefill then a decode
            assert len(q["workers"]) == (1 if q["path"] == "collocated" else 2), q
            assert set(q["workers"]) <= set(ranks) and len(set(q["workers"])) == len(q["workers"])
            # when the coordinator took it and sent its prompt on: after its arrival, before its first token
            # the worker took it, launched a step with its first prompt tokens, landed its first token
            marks = [q["arrival"], q["submitted"], q["dispatched"], q["received"], q["launched"], q["landed"],
                     q["arrival"] + q["ttft_ms"] / 1e3]
            assert marks == sorted(marks), q
    r = CliRunner().invoke(app, ["plot", *files, "--out", str(tmp_path / "png")])
    assert r.exit_code == 0, r.stderr
    pngs = r.stdout.split()
    assert len(pngs) >= 3 and any(p.endswith("slo_attainment.png") for p in pngs)  # the runs had SLOs
    for p in pngs:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(p) > 5000
    r = CliRunner().invoke(app, ["plot", out])  # the folder bench wrote: every JSON in it, PNGs beside them
    assert r.exit_code == 0, r.stderr
    assert sorted(os.path.basename(p) for p in r.stdout.split()) == sorted(os.path.basename(p) for p in pngs)
    assert all(os.path.dirname(p) == out for p in r.stdout.split())


@pytest.mark.parametrize("args, needle", [(["--arrival-rate", "-1"], "arrival-rate"),
                                          (["--goodput", "latency:5"], "goodput"),
                                          (["--mode", "fastest"], "unknown mode"),
                                          (["--max-concurrency", "0"], "max-concurrency")])
def test_bench_bad_input(args, needle):
    r = CliRunner().invoke(app, ["bench", "--model", "dummy:tiny-llama", *args])
    assert r.exit_code == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0]


def test_max_concurrency_caps_requests_in_flight():
    import threading
    import time

    from pdcli.bench.runner import run_load
    from pdcli.bench.workloads import BenchRequest
    from pdcli.coordinator.central import Tracked

    class FakeCoordinator:
        def __init__(self):
            self.open, self.peak, self.lock = 0, 0, threading.Lock()

        def submit(self, prompt_ids, params, mode):
            t = Tracked(f"r{id(prompt_ids)}", 0, prompt_ids, params, 0, mode, time.perf_counter())
            with self.lock:
                self.open += 1
                self.peak = max(self.peak, self.open)

            def finish():
                with self.lock:
                    self.open -= 1
                t.tokens[0], t.finish_time = [1], time.perf_counter()
                t.done.set()
            threading.Timer(0.02, finish).start()
            return t

    cs = FakeCoordinator()
    reqs = [BenchRequest([1, 2, 3], 1) for _ in range(24)]
    records = run_load(cs, reqs, [0.0] * 24, "collocated", drain_timeout=10, max_concurrency=4)
    assert cs.peak == 4 and len(records) == 24 and all(r.error is None for r in records)
    assert records[-1].arrival > records[0].arrival  # waiting for a slot is not counted as latency


def test_resume_skips_the_runs_already_done(tmp_path):
    """A sweep split over two calls: the second, with --resume, runs only the rates the folder lacks."""
    out = str(tmp_path / "sweep")
    base = ["bench", "--model", "dummy:tiny-llama", "--devices", "cpu", "--num-prompts", "2", "--random-input-len",
            "16", "--random-output-len", "2", "--result-dir", out, "--num-kv-blocks", "256", "--block-size", "8"]
    r = CliRunner().invoke(app, [*base, "--arrival-rate", "4"])
    assert r.exit_code == 0, r.stderr
    r = CliRunner().invoke(app, [*base, "--arrival-rate", "4,8", "--resume"])
    assert r.exit_code == 0, r.stderr
    assert "done already" in r.stderr and len(r.stdout.split()) == 1 and r.stdout.strip().endswith("rate8.0.json")
    assert len(glob.glob(os.path.join(out, "*.json"))) == 2


def test_resume_refuses_a_folder_run_with_other_kernels(tmp_path):
    """Every result records the hashes of the kernel sources and profile it ran with; --resume into a folder whose
    runs record others is a one-line error (a sweep must not mix engines), while a run without them is kept."""
    from pdcli.bench import result_files

    out = str(tmp_path / "sweep")
    base = ["bench", "--model", "dummy:tiny-llama", "--devices", "cpu", "--num-prompts", "2", "--random-input-len",
            "16", "--random-output-len", "2", "--result-dir", out, "--num-kv-blocks", "256", "--block-size", "8"]
    r = CliRunner().invoke(app, [*base, "--arrival-rate", "4"])
    assert r.exit_code == 0, r.stderr
    (path,) = glob.glob(os.path.join(out, "*.json"))
    with open(path) as f:
        d = json.load(f)
    assert d["setup"] == result_files.setup(None) and len(d["setup"]["kernels"]) == 16
    r = CliRunner().invoke(app, [*base, "--arrival-rate", "4,8", "--resume"])
    assert r.exit_code == 0 and "done already" in r.stderr, r.stderr
    d["setup"]["kernels"] = "0" * 16  # as if the kernels had changed since
    with open(path, "w") as f:
        json.dump(d, f)
    r = CliRunner().invoke(app, [*base, "--arrival-rate", "4,8,16", "--resume"])
    assert r.exit_code == 2 and "new --result-dir" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert len(glob.glob(os.path.join(out, "*.json"))) == 2  # nothing run
    d["setup"] = dict(result_files.setup(None), router="0" * 16)  # the router's code changed since
    with open(path, "w") as f:
        json.dump(d, f)
    assert result_files.mismatched(out, result_files.setup(None)) == []  # a collocated run: not compared on it
    d["setup"]["profile"] = "1" * 16  # ... nor on the profile, which steers no static run
    with open(path, "w") as f:
        json.dump(d, f)
    assert result_files.mismatched(out, dict(result_files.setup(None), profile="2" * 16)) == []
    d["mode"] = "adaptive"
    with open(path, "w") as f:
        json.dump(d, f)
    assert result_files.mismatched(out, result_files.setup(None), ["collocated"]) == []  # not what is to run
    assert [p for p, _ in result_files.mismatched(out, result_files.setup(None), ["adaptive"])] == [path]
    d["setup"]["router"] = result_files.setup(None)["router"]  # the same router, another profile
    with open(path, "w") as f:
        json.dump(d, f)
    assert [p for p, _ in result_files.mismatched(out, dict(result_files.setup(None), profile="2" * 16), ["adaptive"])] == [path]
    del d["setup"]  # a run from before setups were recorded: not compared
    with open(path, "w") as f:
        json.dump(d, f)
    assert result_files.mismatched(out, result_files.setup(None)) == []


def test_router_sweeps_runs_only_what_is_left_of_a_plan(tmp_path, monkeypatch, capsys):
    """The sweep driver (issue 20's runs split over GPU calls): a line's finished rates are not run again, an
    interrupted one is; a line with nothing left starts no bench; a malformed line is a one-line error."""
    from pdcli.benchmarks import router_sweeps

    monkeypatch.chdir(tmp_path)
    plan = tmp_path / "plan.txt"
    plan.write_text("# comment\nbimodal_s1 collocated bimodal 4.0,4.5,5 1 1.0\n\n"
                    "bimodal_s1 adaptive bimodal 4.5 1 1.0 --max-num-seqs 64\n")
    folder = tmp_path / "results/router/h100_bimodal_s1"
    folder.mkdir(parents=True)
    (folder / "20261205-000000_collocated_bimodal_rate4.0.json").write_text(json.dumps({"mode": "collocated"}))
    (folder / "20261205-000000_collocated_bimodal_rate5.0.json").write_text(json.dumps({"interrupted": True}))
    (folder / "20261205-000000_adaptive_bimodal_rate4.5.json").write_text(json.dumps({"mode": "adaptive"}))
    lines = router_sweeps.parse_plan(str(plan))
    assert [router_sweeps.remaining_rates(x, "h100") for x in lines] == [["4.5", "5"], []]
    with pytest.raises(SystemExit) as stop:  # another kind of GPU than the plan's: nothing runs
        router_sweeps.main([str(plan), "--gpu", "h200", "--expect-gpu", "h100", "--dry-run"])
    assert stop.value.code == router_sweeps.WRONG_GPU and "nothing run" in capsys.readouterr().out
    router_sweeps.main([str(plan), "--gpu", "h100", "--expect-gpu", "h100", "--dry-run"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "--arrival-rate 4.5,5 " in out[0] and "--resume" in out[0]
    assert "--params-dir profiles/nvidia-h100-80gb-hbm3/dummy-llama3-8b" in out[0]
    import tarfile

    router_sweeps.main([str(plan), "--gpu", "h100", "--dry-run", "--bundle", str(tmp_path / "res.tgz")])
    with tarfile.open(tmp_path / "res.tgz") as tar:  # the plain results a call wrote (committed ones are .json.gz)
        assert sorted(tar.getnames()) == sorted(f"results/router/h100_bimodal_s1/{f.name}" for f in folder.iterdir())
    plan.write_text("bimodal_s1 collocated bimodal 4.0\n")
    with pytest.raises(SystemExit, match="FOLDER MODE WORKLOAD"):
        router_sweeps.parse_plan(str(plan))
    # a call's budget holds the workers' start and then whole rates: the rest wait for the next call
    rates = ["4", "5", "6"]
    per_rate = 35 + router_sweeps.RATE_S
    assert router_sweeps.rates_that_fit(rates, router_sweeps.START_S + 2 * per_rate + 1, 35) == ["4", "5"]
    assert router_sweeps.rates_that_fit(rates, router_sweeps.START_S + per_rate - 1, 35) == []
    assert router_sweeps.rates_that_fit(rates, 600, 35) == rates


def test_ttft_parts_splits_each_first_token_by_where_its_time_went(tmp_path):
    """A run with --save-detailed records, per request, when the coordinator took it, sent it on and when the
    worker took it: ttft_parts splits the TTFT at those marks (the parts add up to it) and sets the simulator's
    TTFT on the same trace beside it, apart for requests that met an empty or a held prompt queue."""
    from pdcli.benchmarks import ttft_parts
    from pdcli.router.fit import fit_profile, write_params
    from test_cost_model import synthetic_profile

    q = dict(arrival=1.0, submitted=1.001, dispatched=1.0015, received=1.002, ttft_ms=10.0, workers=[0],
             decision=dict(loads={"0": dict(queued_prefill_tokens=0)}))
    got = ttft_parts.parts_ms(q)
    assert got == pytest.approx(dict(submit=1.0, route=0.5, pipe=0.5, worker=8.0))
    assert sum(got.values()) == pytest.approx(q["ttft_ms"])
    assert ttft_parts.parts_ms(dict(q, received=None)) is None  # a run from before these marks
    held = dict(q, ttft_ms=20.0, decision=dict(loads={"0": dict(queued_prefill_tokens=256)}))
    rows = ttft_parts.run_parts(dict(requests=[q, held]), [7.0, 19.0])
    assert rows["queue_empty"]["ttft_ms"] == 10.0 and rows["queue_empty"]["sim_ttft_ms"] == 7.0
    assert rows["queue_held"]["worker_ms"] == pytest.approx(18.0) and rows["all"]["num_requests"] == 2
    assert "wait_ms" not in rows["all"]  # runs from before the worker's marks
    # the worker's part split where the run records its marks; the simulator's TTFT split where it launched
    marked = dict(q, launched=1.005, landed=1.0095)
    assert ttft_parts.parts_ms(marked) == pytest.approx(dict(submit=1.0, route=0.5, pipe=0.5, worker=8.0, wait=3.0,
                                                             compute=4.5, report=0.5))
    from pdcli.bench.metrics import RequestRecord

    sim = RequestRecord(1.0, 16, 4, first_token=1.007, launched=1.002)
    assert ttft_parts.sim_parts_ms(sim) == pytest.approx(dict(wait=2.0, compute=5.0))
    rows = ttft_parts.run_parts(dict(requests=[marked, held]), [7.0, 19.0], [ttft_parts.sim_parts_ms(sim), None])
    assert rows["queue_empty"]["compute_ms"] == pytest.approx(4.5) and rows["queue_empty"]["sim_compute_ms"] == pytest.approx(5.0)
    assert "wait_ms" not in rows["all"]  # one of the two has no worker marks

    out = str(tmp_path / "run")
    r = CliRunner().invoke(app, ["bench", "--model", "dummy:tiny-llama", "--devices", "cpu", "--mode", "collocated",
                                 "--num-prompts", "4", "--arrival-rate", "8", "--random-input-len", "16",
                                 "--random-output-len", "3", "--result-dir", out, "--save-detailed",
                                 "--num-kv-blocks", "256", "--block-size", "8"])
    assert r.exit_code == 0, r.stderr
    params = tmp_path / "params"
    params.mkdir()
    write_params(str(params), fit_profile(dict(synthetic_profile(), model="dummy:tiny-llama")))
    ttft_parts.main([out, "--params-dir", str(params), "--out", str(tmp_path / "parts")])
    (path,) = glob.glob(str(tmp_path / "parts" / "ttft_parts_*.json"))
    row = json.load(open(path))["rows"][0]["all"]
    assert row["num_requests"] == 4 and row["sim_ttft_ms"] > 0
    assert all(row[f"{p}_ms"] >= 0 for p in ttft_parts.PARTS) and row["worker_ms"] > 0
    assert all(row[f"{p}_ms"] >= 0 for p in ttft_parts.WORKER_PARTS) and row["compute_ms"] > 0
    assert row["sim_wait_ms"] >= 0 and row["sim_compute_ms"] > 0


def test_sweep_ingest_brings_a_bundle_in_and_drops_the_runs_a_budget_cut(tmp_path, monkeypatch, capsys):
    """A GPU call's bundle: its runs land under results/, gzipped where they hold records; a cut run (interrupted)
    is removed (`bench --resume` runs it again); a bundle reaching outside results/ is refused."""
    import tarfile

    from pdcli.benchmarks import sweep_ingest

    stage, repo = tmp_path / "stage", tmp_path / "repo"
    (stage / "results/router/x").mkdir(parents=True)
    repo.mkdir()
    runs = {"20261205-000000_collocated_random_rate1.0.json": dict(slo_attainment=0.95, request_rate=1.0),
            "20261205-000000_collocated_random_rate2.0.json": dict(slo_attainment=0.5, request_rate=2.0, interrupted=True)}
    bundle = tmp_path / "res.tgz"
    with tarfile.open(bundle, "w:gz") as tar:
        for name, d in runs.items():
            (stage / "results/router/x" / name).write_text(json.dumps(dict(d, mode="collocated", requests=[{"arrival": 0}])))
            tar.add(stage / "results/router/x" / name, arcname=f"results/router/x/{name}")
    monkeypatch.chdir(repo)
    sweep_ingest.main([str(bundle), "--no-plots"])
    kept = sorted(os.listdir(repo / "results/router/x"))
    assert kept == ["20261205-000000_collocated_random_rate1.0.json.gz"]
    out = capsys.readouterr().out
    assert "dropped (interrupted)" in out and "collocated     1: 95%" in out
    gz = repo / "results/router/x" / kept[0]
    first = gz.read_bytes()
    gz.unlink()
    monkeypatch.setattr("time.time", lambda: 2e9)  # gzip would stamp this clock's time in the header
    sweep_ingest.main([str(bundle), "--no-plots"])
    assert gz.read_bytes() == first  # gzipped with no timestamp: the same run, the same bytes

    evil = tmp_path / "evil.tgz"
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(stage / "results/router/x" / next(iter(runs)), arcname="../outside.json")
    with pytest.raises(ValueError, match="not a sweep bundle"):
        sweep_ingest.extract(str(evil), str(repo))
    assert not (tmp_path / "outside.json").exists()


def test_engine_benchmark_decode_steps_keep_every_sequence_to_the_end():
    """benchmarks.engine.decode_steps times a full batch: sequences that decode while later prompts are still being
    prefilled (chunked: 16 prompts of 32 tokens at 32 tokens a step) must not end inside the timed steps (they
    did, and a step of fewer sequences counted as one of the batch)."""
    from pdcli import LLM
    from pdcli.benchmarks.engine import decode_steps

    llm = LLM("dummy:tiny-llama", device="cpu", max_num_batched_tokens=32, max_num_seqs=16)
    assert decode_steps(llm, 16, 32, 6) > 0
    assert not llm.engine.has_unfinished_requests()
