"""How close can any prediction made at a request's arrival come? Measured in `pdcli plan`'s simulator, where
the cost model is exact by construction: per workload and rate, the median |relative error| of TTFT and TPOT
of the router (raw and calibrated, from the loads each request met) and of an oracle that knows the whole
state at arrival and the true arrival process: the median, over K simulated futures with fresh arrivals from
`pdcli bench`'s own generators, of the request's own outcome. What the oracle misses is what nobody can know
at arrival: the prompts that come during the request's life. A second oracle aims at the likeliest futures
rather than at their middle (best_window: the median of the largest share of its futures one value gets within
15% of; on lumpy futures, bimodal's, the middle may be where few of them are). Each with the share of requests
it got within 15%. CPU only -> results/router/floor_<device>.json.

    python -m pdcli.benchmarks.router_floor [--params-dir DIR] [--futures 12] [--sample 60]
"""
from __future__ import annotations

import argparse
import copy
import heapq
import json
import sys

import numpy as np

from pdcli.benchmarks.results import provenance, write

PROFILE = "profiles/nvidia-h200/dummy-llama3-8b"
# (workload, burstiness, rates up to past the one-GPU knee with SLOs TTFT 250 ms + 0.1 ms per prompt token and
# TPOT 15 ms, as the router issue's runs); shared-prefix is left out: the simulator has no prefix cache
CASES = (("random", 1.0, (8.0, 12.0, 16.0, 20.0, 22.0)), ("mixed", 1.0, (8.0, 12.0, 16.0, 20.0, 23.0)),
         ("bimodal", 1.0, (2.0, 4.0, 6.0, 8.0)), ("bimodal", 0.5, (2.0, 4.0, 6.0)))
SLO = dict(ttft=250.0, ttft_per_token=0.1, tpot=15.0)
VOCAB, MAX_MODEL_LEN = 32000, 16384
WARMUP_S = 10.0  # requests before this are not scored (the forecast and calibration are warming up)


def one_collocated_gpu():
    """The layout every case here runs: one GPU, one collocated worker (the planner's "1C")."""
    from pdcli.plan.layouts import enumerate_layouts

    return next(lay for lay in enumerate_layouts(1, 1) if lay.name == "1C")


def slo_router(cm):
    """The adaptive router with the issue's SLOs, as the runs priced their requests."""
    from pdcli.router.adaptive import AdaptiveRouter

    return AdaptiveRouter(cm, SLO["ttft"], SLO["tpot"], slo_ttft_per_token_ms=SLO["ttft_per_token"])


def _recording_simulator():
    from pdcli.plan.simulator import Simulator

    class Recording(Simulator):
        """Keeps the loads each request met on arrival and, for chosen requests, a copy of the whole state."""

        def start_recording(self, snap_at: set[int]) -> None:
            self.loads_at, self.snap_at, self.snaps = {}, snap_at, {}

        def _on_arrive(self, seq) -> None:
            if getattr(self, "loads_at", None) is not None:
                self.loads_at[seq.index] = copy.deepcopy(self.loads())
                if seq.index in self.snap_at:
                    kept, self.loads_at, self.snaps = (self.loads_at, self.snaps), None, None
                    snap = copy.deepcopy((self, seq))
                    self.loads_at, self.snaps = kept
                    self.snaps[seq.index] = snap
            super()._on_arrive(seq)

    return Recording


def _future(snap, workload: str, rate: float, burstiness: float, seed: int, horizon_s: float) -> tuple[float, float]:
    """(TTFT ms, TPOT ms) of the snapshot's request in one future: the arrivals after it drawn afresh."""
    from pdcli.bench.arrivals import arrival_times
    from pdcli.bench.workloads import make_requests
    from pdcli.plan.sim import SimSeq

    sim, seq = copy.deepcopy(snap)
    sim.events = [e for e in sim.events if e[2] != "arrive"]
    heapq.heapify(sim.events)
    n = max(1, int(rate * horizon_s))
    times = sim.now + arrival_times(n + 1, rate, burstiness, seed)[1:]
    for i, (t, r) in enumerate(zip(times, make_requests(workload, n, seed, VOCAB, MAX_MODEL_LEN))):
        sim.push(float(t), "arrive", SimSeq(10 ** 9 + i, float(t), len(r.prompt_ids), r.output_len))
    sim._on_arrive(seq)
    while seq.end is None and sim.events:
        sim.now, _, kind, data = heapq.heappop(sim.events)
        getattr(sim, f"_on_{kind}")(*data)
    ttft = (seq.first - seq.arrival) * 1e3
    return ttft, ((seq.end - seq.first) * 1e3 / (seq.output_len - 1) if seq.output_len > 1 else float("nan"))


def best_window(futures, tol: float = 0.15) -> tuple[float, float]:
    """(share, p): the largest share of a request's simulated futures one prediction gets within tol of
    (|p / m - 1| <= tol: m in [p / (1 + tol), p / (1 - tol)]), over every p, and the median of those futures
    (a prediction that aims at the likeliest futures rather than at their middle)."""
    m = np.sort(np.asarray([v for v in futures if np.isfinite(v) and v > 0], float))
    if not len(m):
        return float("nan"), float("nan")
    hi = np.searchsorted(m, m * (1 + tol) / (1 - tol), side="right")
    j = int(np.argmax(hi - np.arange(len(m))))
    return float((hi[j] - j) / len(m)), float(np.median(m[j:hi[j]]))


def _within(pred, meas, tol: float = 0.15) -> float:
    """The share of requests whose measurement the prediction got within tol of (relative)."""
    p, m = np.asarray(pred, float), np.asarray(meas, float)
    ok = np.isfinite(p) & np.isfinite(m) & (m > 0)
    return float(np.mean(np.abs(p[ok] - m[ok]) <= tol * m[ok]))


def _err(pred, meas) -> tuple[float, float]:
    p, m = np.asarray(pred, float), np.asarray(meas, float)
    ok = np.isfinite(p) & np.isfinite(m) & (m > 0)
    return float(np.median(np.abs(p[ok] - m[ok]) / m[ok])), float(np.mean(p[ok] < m[ok]))


def one_rate(cm, workload: str, burstiness: float, rate: float, duration: float, seed: int, futures: int,
             sample: int) -> dict:
    from pdcli.bench.arrivals import arrival_times
    from pdcli.bench.metrics import summarize
    from pdcli.bench.workloads import make_requests
    from pdcli.router.replay import replay_run, simulated_run

    layout = one_collocated_gpu()
    n = int(rate * duration)
    reqs = make_requests(workload, n, seed, VOCAB, MAX_MODEL_LEN)
    arrivals = arrival_times(n, rate, burstiness, seed)
    scored = [i for i in range(n) if arrivals[i] >= WARMUP_S]
    picked = set(scored[:: max(1, len(scored) // sample)][:sample])
    sim = _recording_simulator()(cm, list(layout.specs), layout.mode)
    sim.start_recording(picked)
    recs = sim.run([len(r.prompt_ids) for r in reqs], [r.output_len for r in reqs], arrivals)
    run = simulated_run(layout.specs, layout.mode, rate, recs, SLO, [sim.loads_at[i] for i in range(len(recs))])
    records = run.records
    replayed = {id(x.record): x for x in replay_run(run, slo_router(cm))}
    rows = []
    for i in sorted(picked):
        rec = records[i]
        x = replayed.get(id(rec))
        if x is None or not rec.ok:
            continue
        outs = [_future(sim.snaps[i], workload, rate, burstiness, (seed * 1_000_003 + i) * 1000 + k, 30.0)
                for k in range(futures)]  # futures of their own per request: a shared few would bias every one alike
        outs = np.array(outs, float)
        rows.append((rec.ttft_ms, rec.tpot_ms or np.nan, x.raw["ttft_ms"], x.raw["tpot_ms"], x.predicted["ttft_ms"],
                     x.predicted["tpot_ms"], *np.nanmedian(outs, axis=0),
                     best_window(outs[:, 0])[1], best_window(outs[:, 1])[1]))
    a = np.array(rows, float)
    res = dict(workload=workload, burstiness=burstiness, rate=rate, num_scored=len(a),
               slo_attainment=summarize(recs, SLO)["slo_attainment"])
    for name, cols in (("router_raw", (2, 3)), ("router", (4, 5)), ("oracle", (6, 7)), ("oracle_window", (8, 9))):
        for metric, col, meas in (("ttft", cols[0], 0), ("tpot", cols[1], 1)):
            res[f"{name}_{metric}_err"], res[f"{name}_{metric}_below"] = _err(a[:, col], a[:, meas])
            res[f"{name}_{metric}_within_15"] = _within(a[:, col], a[:, meas])
    return res


def one_trace(cm, run, workload: str, burstiness: float, futures: int, sample: int, seed: int,
              warmup_s: float = 5.0) -> dict:
    """The same oracle on a served run's own trace (its arrivals, lengths, paths, layout), simulated: how close a
    prediction at arrival could have come on the traffic that ran, against the measured TPOT and the simulated
    one, beside the router replayed from the run's recorded state (what `pdcli replay` scores)."""
    from pdcli.plan.validate import run_simulator, simulate_records
    from pdcli.router.replay import replay_run, run_router

    recs = run.records
    scored = [i for i, r in enumerate(recs) if r.ok and r.arrival >= warmup_s and r.tpot_ms]
    picked = set(scored[:: max(1, len(scored) // sample)][:sample])
    sim = run_simulator(run, cm, _recording_simulator())
    sim.start_recording(picked)
    out = simulate_records(run, cm, sim)
    replayed = {id(x.record): x for x in replay_run(run, run_router(run, cm))}
    rows = []
    for i in sorted(picked):
        rec, x = recs[i], replayed.get(id(recs[i]))
        if x is None or i not in sim.snaps:
            continue
        sim_tpot = out[i].tpot_ms
        outs = np.array([_future(sim.snaps[i], workload, run.rate, burstiness, (seed * 1_000_003 + i) * 1000 + k,
                                 30.0)[1] for k in range(futures)], float)
        rows.append((rec.tpot_ms, sim_tpot, x.raw["tpot_ms"], x.predicted["tpot_ms"], float(np.nanmedian(outs)),
                     best_window(outs)[1]))
    a = np.array(rows, float)
    res = dict(file=run.file, mode=run.mode, rate=run.rate, burstiness=burstiness, num_scored=len(a),
               simulated_vs_measured_tpot_err=_err(a[:, 1], a[:, 0])[0])
    for name, col in (("router_raw", 2), ("router", 3), ("oracle", 4), ("oracle_window", 5)):
        res[f"{name}_tpot_err"], res[f"{name}_tpot_below"] = _err(a[:, col], a[:, 0])
        res[f"{name}_tpot_within_15"] = _within(a[:, col], a[:, 0])
        res[f"{name}_tpot_err_vs_simulated"] = _err(a[:, col], a[:, 1])[0]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params-dir", default=PROFILE)
    ap.add_argument("--futures", type=int, default=12, help="simulated futures per scored request")
    ap.add_argument("--sample", type=int, default=60, help="scored requests per rate")
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--out", default="results")
    ap.add_argument("--workloads", default=None, help="comma-separated: only these of the cases")
    ap.add_argument("--traces", nargs="*", default=None,
                    help="served sweep folders: the oracle on their collocated runs' own traces instead of the cases "
                         "(-> results/router/floor_traces_<profile device>.json)")
    args = ap.parse_args(argv)
    from pdcli.router.fit import load_cost_model

    cm = load_cost_model(args.params_dir)
    if args.traces:
        return traces_main(cm, args, argv)
    rows = []
    for workload, burstiness, rates in CASES:
        if args.workloads and workload not in args.workloads.split(","):
            continue
        for rate in rates:
            r = one_rate(cm, workload, burstiness, rate, args.duration, args.seed, args.futures, args.sample)
            rows.append(r)
            print(f"{workload:8s} b={burstiness:g} {rate:5.1f} req/s  attain {r['slo_attainment']:.2f}  "
                  + "  ".join(f"{k} TTFT {r[k + '_ttft_err']:.3f} TPOT {r[k + '_tpot_err']:.3f}"
                              for k in ("router_raw", "router", "oracle", "oracle_window")), flush=True)
    with open(f"{args.params_dir}/params.json") as f:
        device = json.load(f).get("device", "unknown")
    path = write(args.out + "/router", "floor_" + args.params_dir.rstrip("/").split("/")[-2],
                 dict(params_dir=args.params_dir, device_of_profile=device, slo=SLO, rows=rows,
                      provenance=provenance("pdcli.benchmarks.router_floor", argv)))
    print(f"wrote {path}")
    return 0


def traces_main(cm, args, argv) -> int:
    from pdcli.bench import result_files
    from pdcli.router.replay import load_runs

    rows = []
    for folder in args.traces:
        for run in load_runs(folder):
            if run.mode != "collocated":
                continue
            d = result_files.read(run.file)
            r = one_trace(cm, run, d["workload"], d.get("burstiness") or 1.0, args.futures, args.sample, args.seed)
            rows.append(r)
            print(f"{run.file}: TPOT median |rel. err| vs measured: router raw {r['router_raw_tpot_err']:.3f}, "
                  f"calibrated {r['router_tpot_err']:.3f}, oracle {r['oracle_tpot_err']:.3f}, window "
                  f"{r['oracle_window_tpot_err']:.3f} (simulated vs measured {r['simulated_vs_measured_tpot_err']:.3f})",
                  flush=True)
    path = write(args.out + "/router", "floor_traces_" + args.params_dir.rstrip("/").split("/")[-2],
                 dict(params_dir=args.params_dir, traces=args.traces, rows=rows,
                      provenance=provenance("pdcli.benchmarks.router_floor", argv)))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
