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


def _finite(rows: list[dict]) -> list[dict]:
    """The rows at a finite rate (all of them if none is)."""
    return [r for r in rows if _rate(r) != float("inf")] or rows


def _xs(rows: list[dict]) -> list[float]:
    return [_rate(r) if _rate(r) != float("inf") else 0 for r in rows]


def plot_results(results: list[dict], out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    by_mode = defaultdict(list)
    for r in results:
        by_mode[r["mode"]].append(r)
    for rows in by_mode.values():
        rows.sort(key=_rate)
    paths = [_plot_throughput(by_mode, out_dir), _plot_latency_vs_rate(by_mode, results, out_dir)]
    if any(r.get("slo_attainment") is not None for r in results):
        paths.append(_plot_slo_attainment(by_mode, out_dir))
    detailed = [r for r in results if r.get("requests")]
    if detailed:
        paths.append(_plot_latency_cdf(detailed, out_dir))
        pred = [(q["predicted"]["ttft_ms"], q["ttft_ms"]) for r in detailed if r["mode"] == "adaptive"
                for q in r["requests"] if q.get("predicted") and q.get("ttft_ms") is not None]
        if pred:
            paths.append(_plot_router_prediction(pred, out_dir))
    mixes = [(f"{r['mode']}@{r['request_rate']}", r.get("routing_mix", {})) for r in results if r.get("routing_mix")]
    if mixes:
        paths.append(_plot_routing_mix(mixes, out_dir))
    return paths


def _plot_throughput(by_mode: dict[str, list[dict]], out_dir: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, rows in by_mode.items():
        rows = _finite(rows)
        ax.plot(_xs(rows), [r["output_throughput"] for r in rows], "o-", label=mode)
    ax.set(xlabel="arrival rate (req/s)", ylabel="output tokens/s", title="throughput vs arrival rate")
    ax.legend()
    return _save(fig, out_dir, "throughput.png")


def _plot_slo_attainment(by_mode: dict[str, list[dict]], out_dir: str) -> str:
    """SLO attainment per mode against the rate, with the 90% line the highest rate is read at."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, rows in by_mode.items():
        rows = [r for r in _finite(rows) if r.get("slo_attainment") is not None]
        if rows:
            ax.plot(_xs(rows), [100 * r["slo_attainment"] for r in rows], "o-", label=mode)
    ax.axhline(90, color="grey", ls="--", lw=1)
    ax.set(xlabel="arrival rate (req/s)", ylabel="requests within the SLOs (%)", title="SLO attainment vs arrival rate")
    ax.legend()
    return _save(fig, out_dir, "slo_attainment.png")


def _plot_latency_vs_rate(by_mode: dict[str, list[dict]], results: list[dict], out_dir: str) -> str:
    """TTFT and TPOT p50 / p99 per mode, with the SLO line where there is one."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("ttft", "tpot")):
        for mode, rows in by_mode.items():
            rows = _finite(rows)
            line, = ax.plot(_xs(rows), [r[f"median_{metric}_ms"] for r in rows], "o-", label=f"{mode} p50")
            ax.plot(_xs(rows), [r[f"p99_{metric}_ms"] for r in rows], "x--", color=line.get_color(), label=f"{mode} p99")
        slo = next((r.get("goodput_slos", {}).get(metric) for r in results if r.get("goodput_slos")), None)
        if slo:
            ax.axhline(slo, color="red", lw=1, label=f"SLO {slo:g} ms")
        ax.set(xlabel="arrival rate (req/s)", ylabel=f"{metric.upper()} (ms)", title=f"{metric.upper()} vs rate")
        ax.legend(fontsize=7)
    return _save(fig, out_dir, "latency_vs_rate.png")


def _plot_latency_cdf(detailed: list[dict], out_dir: str) -> str:
    """TTFT and end-to-end latency CDFs of each run saved with its requests."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in detailed:
        label = f"{r['mode']} @ {r['request_rate']}"
        for ax, key in zip(axes, ("ttft_ms", "e2el_ms")):
            v = np.sort([q[key] for q in r["requests"] if q.get(key) is not None])
            if len(v):
                ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=label)
            ax.set(xlabel=key.replace("_", " "), ylabel="fraction of requests", title=f"{key.split('_')[0].upper()} CDF")
    axes[0].legend(fontsize=7)
    return _save(fig, out_dir, "latency_cdf.png")


def _plot_router_prediction(pred: list[tuple[float, float]], out_dir: str) -> str:
    """The adaptive router's predicted TTFT against the measured one, per request: (predicted, measured) ms."""
    fig, ax = plt.subplots(figsize=(5, 5))
    p, m = zip(*pred)
    ax.scatter(m, p, s=10)
    hi = max(max(p), max(m))
    ax.plot([0, hi], [0, hi], "k--", lw=0.8)
    ax.set(xlabel="measured TTFT (ms)", ylabel="predicted TTFT (ms)", title="adaptive router: predicted vs measured")
    return _save(fig, out_dir, "router_prediction.png")


def _plot_routing_mix(mixes: list[tuple[str, dict]], out_dir: str) -> str:
    """Stacked share of requests per path, one bar per (mode@rate, routing mix)."""
    fig, ax = plt.subplots(figsize=(max(6, len(mixes) * 0.8), 4))
    bottom = np.zeros(len(mixes))
    for path in ("collocated", "disaggregated"):
        vals = np.array([m.get(path, 0.0) for _, m in mixes])
        ax.bar([n for n, _ in mixes], vals, bottom=bottom, label=path)
        bottom += vals
    ax.set(ylabel="share of requests", title="routing mix")
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    ax.legend()
    return _save(fig, out_dir, "routing_mix.png")


def _save(fig, out_dir: str, name: str) -> str:
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
