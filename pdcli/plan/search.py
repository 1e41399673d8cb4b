"""Rates for `pdcli plan`: every layout at the given rates, or each layout's highest rate with >= 90% SLO
attainment found by bisection."""
from __future__ import annotations

from pdcli.plan.layouts import Layout, simulate

TARGET = 0.9  # SLO attainment a rate must reach (DistServe's measure)


def at_rates(layouts: list[Layout], rates: list[float], run) -> list[dict]:
    """run(layout, rate) -> metrics; one row per layout and rate."""
    return [dict(layout=lay.name, rate=rate, **run(lay, rate)) for lay in layouts for rate in rates]


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
           net_gbps: float | None):
    def run(layout: Layout, rate: float) -> dict:
        return simulate(layout, cm, rate, workload, duration, seed, slos, burstiness=burstiness,
                        router_factory=router_factory, net_gbps=net_gbps)
    return run
