"""Rates for `pdcli plan`: every layout at the given rates, or each layout's highest rate with >= 90% SLO
attainment found by bisection."""
from __future__ import annotations

from pdcli.plan.layouts import Layout, simulate

TARGET = 0.9  # SLO attainment a rate must reach (DistServe's measure)


def at_rates(layouts: list[Layout], rates: list[float], run) -> list[dict]:
    """run(layout, rate) -> metrics; one row per layout and rate, by layout (run rate by rate: every layout meets
    the same requests at a rate, drawn once, layouts.sim_requests)."""
    rows = {(lay.name, rate): run(lay, rate) for rate in rates for lay in layouts}
    return [dict(layout=lay.name, rate=rate, **rows[lay.name, rate]) for lay in layouts for rate in rates]


def highest_rate(layout: Layout, run, lo: float, hi: float, steps: int = 7) -> tuple[float | None, list[dict]]:
    """The highest rate in [lo, hi] whose attainment is >= TARGET (attainment falls with the rate), to
    (hi - lo) / 2^steps; None if lo already misses. Returns it with the rows simulated on the way."""
    rows = []

    def ok(rate: float) -> bool:
        m = run(layout, rate)
        rows.append(dict(layout=layout.name, rate=rate, **m))
        return m.get("slo_attainment", 1.0) >= TARGET

    if not ok(lo):
        return None, rows
    if ok(hi):
        return hi, rows
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo, rows


def runner(cm, workload: str, duration: float, seed: int, slos: dict, burstiness: float, router_factory,
           net_gbps: float | None, seeds: int = 1):
    """run(layout, rate): the metrics of one simulation, or their means over seeds seed .. seed + seeds - 1
    (arrivals and prompts of their own each: one bursty minute is a noisy sample)."""
    def run(layout: Layout, rate: float) -> dict:
        return mean_metrics([simulate(layout, cm, rate, workload, duration, s, slos, burstiness=burstiness,
                                      router_factory=router_factory, net_gbps=net_gbps)
                             for s in range(seed, seed + seeds)])
    return run


def mean_metrics(runs: list[dict]) -> dict:
    """Numbers averaged key by key (dicts of numbers, such as the routing mix, too; a key missing in a run
    counts 0 there); anything else as in the first run."""
    if len(runs) == 1:
        return runs[0]
    out = {}
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = sum(r.get(k, 0) for r in runs) / len(runs)
        elif isinstance(v, dict) and all(isinstance(x, (int, float)) for r in runs for x in r.get(k, {}).values()):
            keys = sorted({x for r in runs for x in r.get(k, {})})
            out[k] = {x: sum(r.get(k, {}).get(x, 0) for r in runs) / len(runs) for x in keys}
        else:
            out[k] = v
    return out
