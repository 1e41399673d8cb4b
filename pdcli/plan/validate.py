"""`pdcli plan --validate RUN_DIR`: simulate each recorded run (its layout, arrivals, lengths and the paths its
requests took, with the profile it ran with) and compare with what it measured. A closed-loop run that kept no
per-request records (`--arrival-rate inf --max-concurrency N`, before `--save-detailed`) is rebuilt from bench's
own request generator where the lengths it gives add up to the run's recorded totals."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from pdcli.bench import result_files
from pdcli.bench.runner import prompt_seed
from pdcli.bench.metrics import max_rate_meeting, summarize
from pdcli.bench.workloads import make_requests
from pdcli.plan.sim import SimSpec
from pdcli.config import CacheConfig
from pdcli.plan.simulator import Simulator, block_hashes
from pdcli.router.cost_model import CostModel
from pdcli.router.replay import Record, Run, read_results, recorded_run, time_sliced

RATE_CLOSE = 0.15  # two layouts whose highest rates differ by more than this are ordered


def simulate_run(run: Run, cm: CostModel, warmup_excluded: int = 0, hashes: list | None = None) -> dict:
    """The simulated run's metrics, with the run's SLOs, less the first warmup_excluded arrivals (as measured);
    hashes: each record's prompt block hashes (rebuilt_hashes), for prefix caching."""
    return summarize(simulate_records(run, cm, hashes=hashes)[warmup_excluded:], run.slo)


def rebuilt_hashes(run: Run, d: dict, block_size: int = CacheConfig.block_size) -> list | None:
    """The block hashes of a recorded `shared-prefix` run's prompts, rebuilt from bench's generator (the run's
    workload, seed, rate and model vocabulary: its records keep lengths, not tokens), where the rebuilt lengths
    are the records'; None for other workloads or where they differ. Without them every prompt would be
    simulated whole, its system prompt too."""
    if d.get("workload") != "shared-prefix" or run.max_concurrency:
        return None
    try:
        from pdcli.models.arch import ModelArch
        from pdcli.models.loader import resolve

        vocab = ModelArch.from_hf_config(resolve(d["model"]).hf_config).vocab_size
    except Exception:  # a model that cannot be resolved here (a path on another machine): no rebuild
        return None
    recs = run.records
    reqs = make_requests(d["workload"], len(recs), prompt_seed(int(d["seed"]), run.rate), vocab, 1 << 20,
                         as_arrays=True)
    if [len(r.prompt_ids) for r in reqs] != [r.input_len for r in recs]:
        return None
    return block_hashes([r.prompt_ids for r in reqs], block_size)


def run_simulator(run: Run, cm: CostModel, cls=Simulator) -> Simulator:
    """A simulator (cls: Simulator or a subclass) of the recorded run's layout and mode. Workers time-sliced on one
    GPU (`--no-mps`) step without the profile's sharing, which MPS measured: as the simulator shares a GPU where
    none was measured, a decode step waits for the neighbour's prefill step to end and a prefill step beside a
    decode takes the default factor (`sim.shared_step_ms`)."""
    specs = [SimSpec(w["rank"], w["role"], "node0:" + w["device"]) for w in run.layout]
    return cls(replace(cm, sharing={}) if run.time_sliced else cm, specs, run.mode, run.pd_on_collocated)


def simulate_records(run: Run, cm: CostModel, sim: Simulator | None = None, hashes: list | None = None) -> list:
    """The recorded run re-run in the simulator (sim, else run_simulator's; its arrivals, lengths and paths): one
    RequestRecord per record of run.records, in its order (arrival order, as load_runs sorts them)."""
    recs = run.records
    return (sim or run_simulator(run, cm)).run([r.input_len for r in recs], [r.output_len for r in recs],
                                                [r.arrival for r in recs], [r.path for r in recs],
                                                max_concurrency=run.max_concurrency, hashes=hashes)


def rebuilt_closed_loop(path: str, d: dict) -> Run | str:
    """A closed-loop run without per-request records rebuilt (every request sent at 0 and held for a slot; lengths
    from bench's generator with the run's workload, count and seed), or why it cannot be."""
    if d.get("requests") or d.get("request_rate") not in ("inf", float("inf")) or not d.get("max_concurrency"):
        return "not a closed-loop run without records"
    reqs = make_requests(d["workload"], int(d["num_prompts"]), int(d["seed"]), 32000, 1 << 20)
    lens = [(len(r.prompt_ids), r.output_len) for r in reqs]
    if (sum(n for n, _ in lens), sum(o for _, o in lens)) != (d.get("total_input_tokens"), d.get("total_output_tokens")):
        return "its lengths are not bench's generator's with the recorded workload and seed (totals differ)"
    path_of = "collocated" if d["mode"] == "collocated" else "disaggregated"
    return Run(path, d["mode"], float("inf"), d["layout"], bool(d.get("pd_on_collocated")),
               [Record(0.0, n, o, None, None, path_of) for n, o in lens], d.get("goodput_slos") or {},
               max_concurrency=int(d["max_concurrency"]), time_sliced=time_sliced(d))


def validation_runs(folder: str) -> tuple[list[Run], dict[str, str]]:
    """folder's runs to simulate, each file read once: those with per-request records (by mode then rate, as
    load_runs), then the closed loops rebuilt; and {file: why not} of the other finished results."""
    runs, rebuilt, skipped = [], [], {}
    for path, d in read_results(folder):
        run = recorded_run(path, d)
        if run is not None:
            runs.append(run)
        elif isinstance(d, dict) and "layout" in d and not d.get("interrupted"):
            run = rebuilt_closed_loop(path, d)
            if isinstance(run, Run):
                rebuilt.append(run)
            else:
                skipped[path] = run
    return sorted(runs, key=lambda r: (r.mode, r.rate)) + rebuilt, skipped


def validate_runs(folder: str, cm: CostModel, runs: list[Run] | None = None) -> list[dict]:
    """One row per (mode, rate): simulated and measured p50 TTFT / TPOT and SLO attainment (runs: folder's
    validation_runs, else read here)."""
    rows = []
    for run in validation_runs(folder)[0] if runs is None else runs:
        measured = result_files.read(run.file)
        sim = simulate_run(run, cm, measured.get("num_warmup_excluded", 0), rebuilt_hashes(run, measured))
        rows.append(dict(run=folder, mode=run.mode, rate=run.rate,
                         **({"max_concurrency": run.max_concurrency} if run.max_concurrency else {}),
                         **({"time_sliced": True} if run.time_sliced else {}),
                         **{f"{k}_{src}": d.get(k) for src, d in (("sim", sim), ("measured", measured))
                            for k in ("median_ttft_ms", "median_tpot_ms", "slo_attainment", "request_throughput")}))
    return rows


def _rel(a: float, b: float) -> float:
    return abs(a - b) / b


def summarize_validation(rows: list[dict]) -> dict:
    """The issue's measures: median p50 errors below saturation (rates up to each layout's measured highest
    rate with >= 90% attainment), the worst relative error of that highest rate, and how often the plan orders
    two layouts as measured where their measured highest rates differ by more than 15%; closed-loop runs (saturated
    by construction) apart, with their p50 and throughput errors. A highest rate is known
    only where the run has a rate above it (its top rate at >= 90% says only "at least"; no rate at >= 90%, "below
    the lowest"): the others' rows count for the errors, their highest rates are listed but not compared."""
    num_runs, num_rows = len({r["run"] for r in rows}), len(rows)
    closed = [r for r in rows if r.get("max_concurrency")]  # saturated by construction: p50s and throughput only
    rows = [r for r in rows if not r.get("max_concurrency")]
    below, highest, unknown = [], {}, {}
    for (run, mode) in sorted({(r["run"], r["mode"]) for r in rows}):
        rs = sorted((r for r in rows if r["run"] == run and r["mode"] == mode), key=lambda r: r["rate"])
        meas = max_rate_meeting([dict(request_rate=r["rate"], slo_attainment=r["slo_attainment_measured"] or 0) for r in rs])
        pred = max_rate_meeting([dict(request_rate=r["rate"], slo_attainment=r["slo_attainment_sim"] or 0) for r in rs])
        below += [r for r in rs if meas is not None and r["rate"] <= meas]
        if meas is None or meas >= rs[-1]["rate"]:
            unknown[(run, mode)] = (meas, pred)
        else:
            highest[(run, mode)] = (meas, pred)
    errs = dict(ttft=[_rel(r["median_ttft_ms_sim"], r["median_ttft_ms_measured"]) for r in below],
                tpot=[_rel(r["median_tpot_ms_sim"], r["median_tpot_ms_measured"]) for r in below])
    rate_errs = [_rel(p or 0.0, m) for m, p in highest.values() if m]
    pairs = agree = 0
    for run in {k[0] for k in highest}:
        layouts = [(k[1], *v) for k, v in highest.items() if k[0] == run and v[0]]
        for i, (_, m1, p1) in enumerate(layouts):
            for _, m2, p2 in layouts[i + 1:]:
                if _rel(max(m1, m2), min(m1, m2)) > RATE_CLOSE:
                    pairs += 1
                    agree += (m1 > m2) == ((p1 or 0) > (p2 or 0))
    return dict(runs=num_runs, rows=num_rows, rows_below_saturation=len(below),
                ttft_p50_err_median=float(np.median(errs["ttft"])) if below else None,
                tpot_p50_err_median=float(np.median(errs["tpot"])) if below else None,
                highest_rate_err_max=max(rate_errs) if rate_errs else None,
                order_pairs=pairs, order_agreement=agree / pairs if pairs else None,
                highest_rates={f"{k[0]} {k[1]}": dict(measured=v[0], predicted=v[1]) for k, v in highest.items()},
                highest_rates_not_bracketed={f"{k[0]} {k[1]}": dict(measured_at_least=v[0], predicted=v[1])
                                             for k, v in unknown.items()},
                closed_loop=[dict(run=r["run"], mode=r["mode"], max_concurrency=r["max_concurrency"],
                                  **({"time_sliced": True} if r.get("time_sliced") else {}),
                                  **{f"{k}_err": _rel(r[f"{m}_sim"], r[f"{m}_measured"]) for k, m in
                                     (("ttft_p50", "median_ttft_ms"), ("tpot_p50", "median_tpot_ms"),
                                      ("throughput", "request_throughput"))}) for r in closed])
