"""`pdcli plan`: which layout serves a traffic best on N GPUs, predicted by simulating the fitted profile;
`--validate RUN_DIR`: the simulation of recorded runs against what they measured."""
from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from pdcli.cli.common import fail


def plan(
    params_dir: Annotated[str, typer.Option(help="Fitted cost model folder (pdcli profile + pdcli fit).")],
    gpus: Annotated[int, typer.Option(help="GPUs to lay out.")] = 2,
    gpus_per_node: Annotated[int, typer.Option(help="GPUs per node (handoffs across nodes use --net-gbps).")] = 8,
    workload: Annotated[str, typer.Option(help="A pdcli bench workload.")] = "random",
    arrival_rate: Annotated[str, typer.Option(help="Requests/s, a comma list.")] = "8,16,32",
    slo_ttft_ms: Annotated[Optional[float], typer.Option()] = None,
    slo_tpot_ms: Annotated[Optional[float], typer.Option()] = None,
    duration: Annotated[float, typer.Option(help="Seconds of simulated arrivals per rate.")] = 60.0,
    seed: Annotated[int, typer.Option()] = 0,
    validate: Annotated[Optional[str], typer.Option(help="Simulate the recorded runs in this folder instead.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout only.")] = False,
) -> None:
    """Predict each layout's SLO attainment per rate (or check the simulation against recorded runs)."""
    from pdcli.router.fit import ProfileError, load_cost_model

    try:
        cm = load_cost_model(params_dir)
    except ProfileError as e:
        fail(str(e))
    if validate:
        return _validate(validate, cm, as_json)
    from pdcli.plan.layouts import enumerate_layouts, simulate
    from pdcli.router.adaptive import AdaptiveRouter

    try:
        rates = [float(r) for r in arrival_rate.split(",")]
    except ValueError:
        fail(f"bad --arrival-rate {arrival_rate!r}: a comma list of numbers")
    slos = {k: v for k, v in (("ttft", slo_ttft_ms), ("tpot", slo_tpot_ms)) if v is not None}
    rows = [dict(layout=lay.name, rate=rate, **simulate(
        lay, cm, rate, workload, duration, seed, slos,
        router_factory=lambda: AdaptiveRouter(cm, slo_ttft_ms, slo_tpot_ms)))
        for lay in enumerate_layouts(gpus, gpus_per_node) for rate in rates]
    _print_plan(rows, slos, as_json)


def _print_plan(rows: list[dict], slos: dict, as_json: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    from pdcli.bench.metrics import max_rate_meeting

    if as_json:
        json.dump(rows, sys.stdout, indent=1, default=float)
        sys.stdout.write("\n")
        return
    table = Table(title="predicted by simulation")
    for col in ("layout", "rate", "SLO ok", "TTFT p50/p90 ms", "TPOT p50/p90 ms", "goodput req/s"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["layout"], str(r["rate"]), f"{r.get('slo_attainment', 1.0):.0%}",
                      f"{r['median_ttft_ms']:.0f}/{r['p90_ttft_ms']:.0f}", f"{r['median_tpot_ms']:.1f}/{r['p90_tpot_ms']:.1f}",
                      f"{r.get('request_goodput', r['request_throughput']):.1f}")
    Console().print(table)
    if slos:
        best = {lay: max_rate_meeting([dict(request_rate=r["rate"], slo_attainment=r["slo_attainment"])
                                       for r in rows if r["layout"] == lay]) for lay in dict.fromkeys(r["layout"] for r in rows)}
        Console().print("highest rate with >= 90% SLO attainment: " + ", ".join(f"{k} {v}" for k, v in best.items()))


def _validate(folder: str, cm, as_json: bool) -> None:
    from rich.console import Console

    from pdcli.plan.validate import summarize_validation, validate_runs

    rows = validate_runs(folder, cm)
    if not rows:
        fail(f"{folder} holds no bench results with per-request records (run `pdcli bench --save-detailed`)")
    summary = summarize_validation(rows)
    if as_json:
        json.dump(dict(rows=rows, summary=summary), sys.stdout, indent=1)
        sys.stdout.write("\n")
        return
    for r in rows:
        Console().print(f"{r['mode']:13s} {r['rate']:7.1f} TTFT p50 sim {r['median_ttft_ms_sim']:8.1f} measured "
                        f"{r['median_ttft_ms_measured']:8.1f} | TPOT p50 sim {r['median_tpot_ms_sim']:6.2f} measured "
                        f"{r['median_tpot_ms_measured']:6.2f}")
    Console().print({k: v for k, v in summary.items() if k != "highest_rates"})
