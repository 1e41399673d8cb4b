"""`pdcli plan`'s output: the table (best layout first), the assumptions, a PNG of goodput against rate."""
from __future__ import annotations

import os

from pdcli.bench.metrics import max_rate_meeting


def highest_by_layout(rows: list[dict], found: dict | None = None) -> dict[str, float | None]:
    if found is not None:
        return found
    names = dict.fromkeys(r["layout"] for r in rows)
    return {n: max_rate_meeting([dict(request_rate=r["rate"], slo_attainment=r.get("slo_attainment", 1.0))
                                 for r in rows if r["layout"] == n]) for n in names}


def print_table(rows: list[dict], highest: dict, gpus: dict[str, int], assumptions: list[str], console) -> None:
    from rich.table import Table

    order = sorted(highest, key=lambda n: -(highest[n] or 0.0))
    if order and highest[order[0]]:
        console.print(f"[bold]best: {order[0]}[/bold], {highest[order[0]]:.1f} req/s with >= 90% of requests within "
                      f"the SLOs ({highest[order[0]] / gpus[order[0]]:.2f} req/s per GPU)")
    for a in assumptions:
        console.print(f"assumes: {a}")
    table = Table(title="predicted by simulation")
    for col in ("layout", "rate", "SLO ok", "goodput/GPU", "TTFT p50/p90 ms", "TPOT p50/p90 ms", "handed off"):
        table.add_column(col)
    for name in order:
        for r in sorted((r for r in rows if r["layout"] == name), key=lambda r: r["rate"]):
            table.add_row(name, f"{r['rate']:.1f}", f"{r.get('slo_attainment', 1.0):.0%}",
                          f"{r.get('request_goodput', r['request_throughput']) / gpus[name]:.2f}",
                          f"{r['median_ttft_ms']:.0f}/{r['p90_ttft_ms']:.0f}",
                          f"{r['median_tpot_ms']:.1f}/{r['p90_tpot_ms']:.1f}",
                          f"{r['routing_mix'].get('disaggregated', 0.0):.0%}")
    console.print(table)
    console.print("highest rate with >= 90% SLO attainment: " +
                  ", ".join(f"{n} {highest[n] if highest[n] is not None else 'none'}" for n in order))


def plot_goodput(rows: list[dict], gpus: dict[str, int], out_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["layout"] for r in rows):
        rs = sorted((r for r in rows if r["layout"] == name), key=lambda r: r["rate"])
        ax.plot([r["rate"] for r in rs], [r.get("request_goodput", r["request_throughput"]) / gpus[name] for r in rs],
                marker="o", label=name)
    ax.set_xlabel("arrival rate (req/s)")
    ax.set_ylabel("goodput per GPU (req/s within the SLOs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "plan_goodput.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
