"""Serving metrics with vLLM's names. Every request counts: failed and aborted ones are reported and
miss every SLO; latency percentiles are over completed requests."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestRecord:
    arrival: float  # s, when the request was scheduled to be sent (queueing counts)
    input_len: int
    output_len: int = 0
    first_token: float | None = None  # s
    token_times: list[float] = field(default_factory=list)  # s, each output token
    end: float | None = None  # s
    error: str | None = None
    aborted: bool = False
    path: str = ""
    predicted: dict = field(default_factory=dict)  # router predictions for the path taken (calibrated)
    predicted_raw: dict = field(default_factory=dict)  # ... from the cost model alone
    workers: tuple = ()  # ranks that ran it: (collocated,) or (prefill, decode)
    decision: dict = field(default_factory=dict)  # the router's: both paths' predictions, each worker's load
    # s, in process: when the coordinator took it (after its lock) and when its prompt went to a worker
    submitted: float | None = None
    dispatched: float | None = None
    received: float | None = None  # s, when the worker that prefilled it took it (its clock: the same host's)
    launched: float | None = None  # s, when the launch of a step with its first prompt tokens began there
    landed: float | None = None  # s, when the step with its first token landed there

    @property
    def ok(self) -> bool:
        return self.error is None and not self.aborted and self.end is not None

    @property
    def ttft_ms(self) -> float:
        return (self.first_token - self.arrival) * 1e3

    @property
    def e2el_ms(self) -> float:
        return (self.end - self.arrival) * 1e3

    @property
    def tpot_ms(self) -> float:
        """(E2E - TTFT) / (n - 1); 0 for a single-token output."""
        return (self.e2el_ms - self.ttft_ms) / (self.output_len - 1) if self.output_len > 1 else 0.0

    @property
    def itls_ms(self) -> list[float]:
        return list(np.diff(self.token_times) * 1e3)


def _stats(name: str, values: list[float]) -> dict:
    v = np.asarray(values, float) if len(values) else np.zeros(1)
    return {f"mean_{name}_ms": float(v.mean()), f"median_{name}_ms": float(np.median(v)),
            f"std_{name}_ms": float(v.std()), f"p90_{name}_ms": float(np.percentile(v, 90)),
            f"p99_{name}_ms": float(np.percentile(v, 99))}


def slo_limits(goodput: dict[str, float], input_len: int) -> dict[str, float]:
    """The SLOs of one request, ms: a TTFT SLO grows by goodput["ttft_per_token"] per prompt token."""
    limits = {k: v for k, v in goodput.items() if k != "ttft_per_token"}
    if "ttft" in limits:
        limits["ttft"] += goodput.get("ttft_per_token", 0.0) * input_len
    return limits


def meets(r: RequestRecord, goodput: dict[str, float]) -> bool:
    """A request is good iff it completed and every listed metric (ttft, tpot, e2el in ms) is within its SLO."""
    return r.ok and all(getattr(r, f"{k}_ms") <= v for k, v in slo_limits(goodput, r.input_len).items())


def summarize(records: list[RequestRecord], goodput: dict[str, float] | None = None) -> dict:
    done = [r for r in records if r.ok]
    failed = sum(1 for r in records if r.error is not None and not r.aborted)
    aborted = sum(1 for r in records if r.aborted)
    start = min((r.arrival for r in records), default=0.0)
    end = max((r.end for r in done), default=start)
    duration = max(end - start, 1e-9)
    out_tokens = sum(r.output_len for r in done)
    in_tokens = sum(r.input_len for r in done)
    res = dict(num_prompts=len(records), completed=len(done), failed=failed, aborted=aborted, duration=duration,
               total_input_tokens=in_tokens, total_output_tokens=out_tokens,
               request_throughput=len(done) / duration, output_throughput=out_tokens / duration,
               total_token_throughput=(in_tokens + out_tokens) / duration)
    res.update(_stats("ttft", [r.ttft_ms for r in done]))
    res.update(_stats("tpot", [r.tpot_ms for r in done if r.output_len > 1]))
    res.update(_stats("itl", [x for r in done for x in r.itls_ms]))
    res.update(_stats("e2el", [r.e2el_ms for r in done]))
    if goodput:
        good = sum(meets(r, goodput) for r in records)
        res.update(request_goodput=good / duration, slo_attainment=good / max(len(records), 1), goodput_slos=goodput)
    reasons = [r.error.split(":", 1)[0][:80] for r in records if r.error is not None and not r.aborted]
    res["failure_reasons"] = {k: reasons.count(k) for k in sorted(set(reasons))}  # e.g. 'HTTP 429 server_overloaded'
    paths = [r.path for r in records if r.path]
    res["routing_mix"] = {p: paths.count(p) / len(paths) for p in sorted(set(paths))} if paths else {}
    for suffix, key in (("", "predicted"), ("_raw", "predicted_raw")):
        errs = {}
        for r in done:
            pred = getattr(r, key)
            for k, m in (("ttft", r.ttft_ms), ("tpot", r.tpot_ms if r.output_len > 1 else 0.0)):
                if pred and f"{k}_ms" in pred and m > 0:
                    errs.setdefault(k, []).append(abs(pred[f"{k}_ms"] - m) / m)
        for k, e in errs.items():  # the router's prediction for the path taken against the outcome
            res[f"router_{k}_median_abs_rel_err{suffix}"] = float(np.median(e))
        if errs:
            res[f"router_median_abs_rel_err{suffix}"] = float(np.median([x for e in errs.values() for x in e]))
    return res


def max_rate_meeting(rows: list[dict], target: float = 0.9) -> float | None:
    """DistServe's measure: the highest swept rate whose SLO attainment is at least target."""
    ok = [r["request_rate"] for r in rows if r.get("slo_attainment", 0) >= target and r["request_rate"] != "inf"]
    return max(ok) if ok else None
