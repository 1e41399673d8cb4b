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
    gpus_per_node: Annotated[int, typer.Option(help="GPUs per node.")] = 8,
    net_gbps: Annotated[Optional[float], typer.Option(help="Gbit/s between nodes, for handoffs across nodes "
                                                           "when the profile has no such transfer.")] = None,
    workload: Annotated[str, typer.Option(help="A pdcli bench workload.")] = "random",
    arrival_rate: Annotated[str, typer.Option(help="Requests/s, a comma list.")] = "8,16,32",
    find_max_rate: Annotated[bool, typer.Option(help="Find each layout's highest rate with >= 90% SLO attainment "
                                                     "(between the lowest and highest --arrival-rate).")] = False,
    burstiness: Annotated[float, typer.Option(help="Gamma shape of the gaps: 1 = Poisson.")] = 1.0,
    slo_ttft_ms: Annotated[Optional[float], typer.Option()] = None,
    slo_tpot_ms: Annotated[Optional[float], typer.Option()] = None,
    slo_ttft_per_token_ms: Annotated[float, typer.Option(
        min=0, help="The TTFT SLO grows by this per prompt token (as pdcli bench's).")] = 0.0,
    layouts: Annotated[Optional[str], typer.Option(help="Only these, e.g. 8C,2P6D,adaptive-8C.")] = None,
    duration: Annotated[float, typer.Option(help="Seconds of simulated arrivals per rate.")] = 60.0,
    seed: Annotated[int, typer.Option()] = 0,
    seeds: Annotated[int, typer.Option(min=1, help="Average each rate over this many seeds (from --seed).")] = 1,
    out: Annotated[Optional[str], typer.Option(help="Folder for plan_goodput.png and plan.json.")] = None,
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
    try:
        rates = sorted(float(r) for r in arrival_rate.split(","))
        lays = _layouts(layouts, gpus, gpus_per_node)
    except ValueError as e:
        fail(str(e))
    slos = {k: v for k, v in (("ttft", slo_ttft_ms), ("tpot", slo_tpot_ms)) if v is not None}
    if slo_ttft_ms is not None and slo_ttft_per_token_ms:
        slos["ttft_per_token"] = slo_ttft_per_token_ms
    if find_max_rate and (not slos or len(rates) < 2):
        fail("--find-max-rate needs an SLO (--slo-ttft-ms, --slo-tpot-ms) and two --arrival-rate bounds")
    run = _runner(cm, workload, duration, seed, slos, burstiness, net_gbps, slo_ttft_ms, slo_tpot_ms,
                  slo_ttft_per_token_ms, seeds)
    assumptions = _assumptions(cm, lays, net_gbps)  # before simulating: the simulator adds the assumed "net" pair
    rows, highest = _simulate(lays, rates, run, find_max_rate)
    _report(rows, highest, lays, assumptions, out, as_json)


def _layouts(text: str | None, gpus: int, gpus_per_node: int):
    from pdcli.plan.layouts import enumerate_layouts, parse_layouts

    return parse_layouts(text, gpus_per_node) if text else enumerate_layouts(gpus, gpus_per_node)


def _runner(cm, workload, duration, seed, slos, burstiness, net_gbps, slo_ttft_ms, slo_tpot_ms, per_token,
            seeds=1):
    from pdcli.plan.search import runner
    from pdcli.router.adaptive import AdaptiveRouter

    return runner(cm, workload, duration, seed, slos, burstiness,
                  lambda: AdaptiveRouter(cm, slo_ttft_ms, slo_tpot_ms, slo_ttft_per_token_ms=per_token), net_gbps,
                  seeds)


def _simulate(lays, rates, run, find_max_rate):
    from pdcli.plan.search import at_rates, highest_rate

    if not find_max_rate:
        return at_rates(lays, rates, run), None
    rows, highest = [], {}
    for lay in lays:
        highest[lay.name], found = highest_rate(lay, run, rates[0], rates[-1])
        rows += found
    return rows, highest


def _assumptions(cm, lays, net_gbps) -> list[str]:
    from pdcli.plan.layouts import cross_node

    out = [f"step times from the fitted profile; transfers as profiled: {', '.join(cm.transfer) or 'none'}"]
    if any(lay.mode != "collocated" for lay in lays) and "gpu-nccl" not in cm.transfer:
        out.append(f"handoffs between GPUs of a node priced as the profile's {next(iter(cm.transfer), '?')} "
                   "(profile on a machine with two GPUs to measure them)")
    if any(cross_node(lay) for lay in lays) and "net" not in cm.transfer:
        out.append(f"handoffs across nodes at {net_gbps} Gbit/s (--net-gbps)" if net_gbps else
                   "handoffs across nodes at the profile's GPU-to-GPU transfer rate (pass --net-gbps)")
    return out


def _report(rows, highest, lays, assumptions, out, as_json) -> None:
    from rich.console import Console

    from pdcli.plan.report import highest_by_layout, plot_goodput, print_table

    highest = highest_by_layout(rows, highest)
    gpus = {lay.name: len({s.device for s in lay.specs}) for lay in lays}
    if out:
        import os

        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "plan.json"), "w") as f:
            json.dump(dict(rows=rows, highest=highest, assumptions=assumptions), f, indent=1, default=float)
    if as_json:
        json.dump(dict(rows=rows, highest=highest, assumptions=assumptions), sys.stdout, indent=1, default=float)
        sys.stdout.write("\n")
        return
    err = Console(stderr=True)
    print_table(rows, highest, gpus, assumptions, Console())
    if out:
        err.print(f"plot -> {plot_goodput(rows, gpus, out)}")


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
        closed = f" | req/s sim {r['request_throughput_sim']:6.2f} measured {r['request_throughput_measured']:6.2f}" \
            f" (closed loop of {r['max_concurrency']}{', time-sliced' if r.get('time_sliced') else ''})" \
            if r.get("max_concurrency") else ""
        Console().print(f"{r['mode']:13s} {r['rate']:7.1f} TTFT p50 sim {r['median_ttft_ms_sim']:8.1f} measured "
                        f"{r['median_ttft_ms_measured']:8.1f} | TPOT p50 sim {r['median_tpot_ms_sim']:6.2f} measured "
                        f"{r['median_tpot_ms_measured']:6.2f}{closed}")
    Console().print({k: v for k, v in summary.items() if k != "highest_rates"})
