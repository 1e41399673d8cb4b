"""`pdcli plan --validate RUN_DIR`: simulate each recorded run (its layout, arrivals, lengths and the paths its
requests took, with the profile it ran with) and compare with what it measured."""
from __future__ import annotations

import numpy as np

from pdcli.bench import result_files
from pdcli.bench.metrics import max_rate_meeting, summarize
from pdcli.plan.sim import SimSpec
from pdcli.plan.simulator import Simulator
from pdcli.router.cost_model import CostModel
from pdcli.router.replay import Run, load_runs

RATE_CLOSE = 0.15  # two layouts whose highest rates differ by more than this are ordered


def simulate_run(run: Run, cm: CostModel, warmup_excluded: int = 0) -> dict:
    """The simulated run's metrics, with the run's SLOs, less the first warmup_excluded arrivals (as measured)."""
    return summarize(simulate_records(run, cm)[warmup_excluded:], run.slo)


def run_simulator(run: Run, cm: CostModel, cls=Simulator) -> Simulator:
    """A simulator (cls: Simulator or a subclass) of the recorded run's layout and mode."""
    specs = [SimSpec(w["rank"], w["role"], "node0:" + w["device"]) for w in run.layout]
    return cls(cm, specs, run.mode, run.pd_on_collocated)


def simulate_records(run: Run, cm: CostModel, sim: Simulator | None = None) -> list:
    """The recorded run re-run in the simulator (sim, else run_simulator's; its arrivals, lengths and paths): one
    RequestRecord per record of run.records, in its order (arrival order, as load_runs sorts them)."""
    recs = run.records
    return (sim or run_simulator(run, cm)).run([r.input_len for r in recs], [r.output_len for r in recs],
                                                [r.arrival for r in recs], [r.path for r in recs])


def validate_runs(folder: str, cm: CostModel) -> list[dict]:
    """One row per (mode, rate): simulated and measured p50 TTFT / TPOT and SLO attainment."""
    rows = []
    for run in load_runs(folder):
        measured = result_files.read(run.file)
        sim = simulate_run(run, cm, measured.get("num_warmup_excluded", 0))
        rows.append(dict(run=folder, mode=run.mode, rate=run.rate,
                         **{f"{k}_{src}": d.get(k) for src, d in (("sim", sim), ("measured", measured))
                            for k in ("median_ttft_ms", "median_tpot_ms", "slo_attainment")}))
    return rows


def _rel(a: float, b: float) -> float:
    return abs(a - b) / b


def summarize_validation(rows: list[dict]) -> dict:
    """The issue's measures: median p50 errors below saturation (rates up to each layout's measured highest
    rate with >= 90% attainment), the worst relative error of that highest rate, and how often the plan orders
    two layouts as measured where their measured highest rates differ by more than 15%. A highest rate is known
    only where the run has a rate above it (its top rate at >= 90% says only "at least"; no rate at >= 90%, "below
    the lowest"): the others' rows count for the errors, their highest rates are listed but not compared."""
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
    return dict(runs=len({r["run"] for r in rows}), rows=len(rows), rows_below_saturation=len(below),
                ttft_p50_err_median=float(np.median(errs["ttft"])) if below else None,
                tpot_p50_err_median=float(np.median(errs["tpot"])) if below else None,
                highest_rate_err_max=max(rate_errs) if rate_errs else None,
                order_pairs=pairs, order_agreement=agree / pairs if pairs else None,
                highest_rates={f"{k[0]} {k[1]}": dict(measured=v[0], predicted=v[1]) for k, v in highest.items()},
                highest_rates_not_bracketed={f"{k[0]} {k[1]}": dict(measured_at_least=v[0], predicted=v[1])
                                             for k, v in unknown.items()})
