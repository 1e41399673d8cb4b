"""PNG figures from bench result JSON files."""
from __future__ import annotations

import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _rate(r) -> float:
    return float("inf") if r["request_rate"] == "inf" else float(r["request_rate"])


def plot_results(results: list[dict], out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    by_mode = defaultdict(list)
    for r in results:
        by_mode[r["mode"]].append(r)
    for rows in by_mode.values():
        rows.sort(key=_rate)
    finite = lambda rows: [r for r in rows if _rate(r) != float("inf")] or rows  # noqa: E731
    xs = lambda rows: [_rate(r) if _rate(r) != float("inf") else 0 for r in rows]  # noqa: E731
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, rows in by_mode.items():
        rows = finite(rows)
        ax.plot(xs(rows), [r["output_throughput"] for r in rows], "o-", label=mode)
    ax.set(xlabel="arrival rate (req/s)", ylabel="output tokens/s", title="throughput vs arrival rate")
    ax.legend()
    paths.append(_save(fig, out_dir, "throughput.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("ttft", "tpot")):
        for mode, rows in by_mode.items():
            rows = finite(rows)
            line, = ax.plot(xs(rows), [r[f"median_{metric}_ms"] for r in rows], "o-", label=f"{mode} p50")
            ax.plot(xs(rows), [r[f"p99_{metric}_ms"] for r in rows], "x--", color=line.get_color(), label=f"{mode} p99")
        slo = next((r.get("goodput_slos", {}).get(metric) for r in results if r.get("goodput_slos")), None)
        if slo:
            ax.axhline(slo, color="red", lw=1, label=f"SLO {slo:g} ms")
        ax.set(xlabel="arrival rate (req/s)", ylabel=f"{metric.upper()} (ms)", title=f"{metric.upper()} vs rate")
        ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir, "latency_vs_rate.png"))

    detailed = [r for r in results if r.get("requests")]
    if detailed:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for r in detailed:
            label = f"{r['mode']} @ {r['request_rate']}"
            for ax, key in zip(axes, ("ttft_ms", "e2el_ms")):
                v = np.sort([q[key] for q in r["requests"] if q.get(key) is not None])
                if len(v):
                    ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=label)
                ax.set(xlabel=key.replace("_", " "), ylabel="fraction of requests", title=f"{key.split('_')[0].upper()} CDF")
        axes[0].legend(fontsize=7)
        paths.append(_save(fig, out_dir, "latency_cdf.png"))
        pred = [(q["predicted"]["ttft_ms"], q["ttft_ms"]) for r in detailed if r["mode"] == "adaptive"
                for q in r["requests"] if q.get("predicted") and q.get("ttft_ms") is not None]
        if pred:
            fig, ax = plt.subplots(figsize=(5, 5))
            p, m = zip(*pred)
            ax.scatter(m, p, s=10)
            hi = max(max(p), max(m))
            ax.plot([0, hi], [0, hi], "k--", lw=0.8)
            ax.set(xlabel="measured TTFT (ms)", ylabel="predicted TTFT (ms)", title="adaptive router: predicted vs measured")
            paths.append(_save(fig, out_dir, "router_prediction.png"))

    mixes = [(f"{r['mode']}@{r['request_rate']}", r.get("routing_mix", {})) for r in results if r.get("routing_mix")]
    if mixes:
        fig, ax = plt.subplots(figsize=(max(6, len(mixes) * 0.8), 4))
        bottom = np.zeros(len(mixes))
        for path in ("collocated", "disaggregated"):
            vals = np.array([m.get(path, 0.0) for _, m in mixes])
            ax.bar([n for n, _ in mixes], vals, bottom=bottom, label=path)
            bottom += vals
        ax.set(ylabel="share of requests", title="routing mix")
        ax.tick_params(axis="x", rotation=45, labelsize=7)
        ax.legend()
        paths.append(_save(fig, out_dir, "routing_mix.png"))
    return paths


def _save(fig, out_dir: str, name: str) -> str:
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
