"""Issue 20's acceptance 2 from sweeps summarised by router_summary.sweep (one folder per workload and seed, every
mode in it): per workload, each seed's knee (the best static mode's highest rate with >= 90% SLO attainment),
adaptive's highest rate and, at 1.25x and 1.5x of the knee, adaptive's attainment against the best static mode's
there (the higher of the two static modes at that rate; between two measured rates, linearly interpolated; past a
static mode's last rate, bounded by its attainment there); then the means over the seeds."""
from __future__ import annotations

from pdcli.benchmarks.router_summary import STATIC

PAST_KNEE = (1.25, 1.5)


def _points(rows: list[dict], mode: str) -> list[tuple[float, float]]:
    """(rate, SLO attainment) of mode's measured rates, by rate."""
    return sorted((r["rate"], r["slo_attainment"]) for r in rows
                  if r["mode"] == mode and r["slo_attainment"] is not None)


def attainment_at(rows: list[dict], mode: str, rate: float) -> float | None:
    """mode's SLO attainment at rate: measured there, else interpolated between the measured rates around it."""
    pts = _points(rows, mode)
    for (r0, a0), (r1, a1) in zip(pts, pts[1:]):
        if r0 <= rate <= r1:
            return a0 if r1 == r0 else a0 + (a1 - a0) * (rate - r0) / (r1 - r0)
    return pts[0][1] if len(pts) == 1 and pts[0][0] == rate else None


def seed_row(sweep: dict) -> dict:
    knee, highest = sweep["knee"], sweep["highest_rate"]
    row = dict(folder=sweep["folder"], knee=knee, adaptive_highest_rate=highest.get("adaptive"),
               best_static_highest_rate=knee)
    for x in PAST_KNEE:
        row[f"at_{x:g}x"] = dict(rate=knee * x, adaptive=attainment_at(sweep["rows"], "adaptive", knee * x),
                                 best_static=best_static_at(sweep["rows"], knee * x))
    return row


def best_static_at(rows: list[dict], rate: float) -> float | None:
    """The higher static attainment at rate. A static mode whose rates end below it is bounded by its attainment
    at its last rate (attainment falls with the rate): it cannot be the best where that bound is under the other's;
    otherwise (or neither measured) None."""
    known, bounds = [], []
    for m in STATIC:
        a, pts = attainment_at(rows, m, rate), _points(rows, m)
        if a is not None:
            known.append(a)
        elif pts and pts[-1][0] < rate:
            bounds.append(pts[-1][1])
        else:
            return None
    return max(known) if known and all(b <= max(known) for b in bounds) else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def versus_static(sweeps: list[dict]) -> dict:
    """{workload: {seeds: [seed_row...], means}} over the sweeps with a knee and adaptive runs; a mean counts the
    seeds that have the figure (`seeds_with` says how many)."""
    out = {}
    for workload in sorted({s["workload"] for s in sweeps}):
        rows = [seed_row(s) for s in sweeps if s["workload"] == workload and s["knee"] is not None
                and "adaptive" in s["highest_rate"]]
        if not rows:
            continue
        means = dict(knee=_mean(r["knee"] for r in rows),
                     adaptive_highest_rate=_mean(r["adaptive_highest_rate"] or 0.0 for r in rows))
        for x in PAST_KNEE:
            pairs = [r[f"at_{x:g}x"] for r in rows
                     if r[f"at_{x:g}x"]["adaptive"] is not None and r[f"at_{x:g}x"]["best_static"] is not None]
            means[f"at_{x:g}x"] = dict(adaptive=_mean(p["adaptive"] for p in pairs),
                                       best_static=_mean(p["best_static"] for p in pairs), seeds_with=len(pairs))
        out[workload] = dict(seeds=rows, means=means)
    return out
