"""Prometheus text for /metrics: requests by endpoint and status, requests refused (overloaded, draining),
requests waiting for a first token, queues, KV blocks, TTFT/TPOT histograms, transfer bytes."""
from __future__ import annotations

import bisect
from collections import Counter

BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)


class Histogram:
    def __init__(self):
        self.counts = [0] * (len(BUCKETS_MS) + 1)
        self.total, self.n = 0.0, 0

    def observe(self, ms: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS_MS, ms)] += 1
        self.total += ms
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [f"# TYPE {name} histogram"], 0
        for le, c in zip(BUCKETS_MS, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{le}"}} {acc}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total}", f"{name}_count {self.n}"]
        return out


class ServerMetrics:
    def __init__(self):
        self.requests: Counter = Counter()
        self.rejected: Counter = Counter()  # reason (overloaded | draining) -> requests refused before submission
        self.ttft, self.tpot = Histogram(), Histogram()

    def request(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] += 1

    def finished(self, out) -> None:
        m = out.metrics
        if out.error or m.get("first_token_time") is None or m.get("finished_time") is None:
            return
        ttft = (m["first_token_time"] - m["arrival_time"]) * 1e3
        self.ttft.observe(ttft)
        n = len(out.token_ids)
        if n > 1:
            self.tpot.observe(((m["finished_time"] - m["arrival_time"]) * 1e3 - ttft) / (n - 1))

    def render(self, worker_stats: list[dict], accounting: dict, waiting: int = 0, draining: bool = False) -> str:
        lines = ["# TYPE pdcli_requests_total counter"]
        lines += [f'pdcli_requests_total{{endpoint="{e}",status="{s}"}} {c}' for (e, s), c in sorted(self.requests.items())]
        lines.append("# TYPE pdcli_requests_rejected_total counter")
        lines += [f'pdcli_requests_rejected_total{{reason="{r}"}} {self.rejected[r]}' for r in ("overloaded", "draining")]
        lines += ["# TYPE pdcli_requests_waiting_first_token gauge", f"pdcli_requests_waiting_first_token {waiting}",
                  "# TYPE pdcli_draining gauge", f"pdcli_draining {int(draining)}"]
        for name, key in (("pdcli_num_requests_running", "running"), ("pdcli_num_requests_waiting", "waiting"),
                          ("pdcli_kv_blocks_free", "num_free_blocks"), ("pdcli_kv_blocks_total", "num_blocks")):
            lines.append(f"# TYPE {name} gauge")
            lines += [f'{name}{{{_worker(w)}}} {w[key]}' for w in worker_stats]
        lines.append("# TYPE pdcli_kv_cache_usage gauge")
        lines += [f'pdcli_kv_cache_usage{{{_worker(w)}}} '
                  f'{1 - w["num_free_blocks"] / max(1, w["num_blocks"]):.6f}' for w in worker_stats]
        for path, acc in accounting.items():
            for key in ("requests", "output_tokens", "failed", "aborted", "transfer_bytes"):
                lines.append(f'pdcli_path_{key}_total{{path="{path}"}} {acc[key]}')
        lines += self.ttft.lines("pdcli_time_to_first_token_ms") + self.tpot.lines("pdcli_time_per_output_token_ms")
        return "\n".join(lines) + "\n"


def _worker(w: dict) -> str:
    """A worker's labels: its rank, role and node (0: the head's)."""
    return f'rank="{w["rank"]}",role="{w["role"]}",node="{w.get("node", 0)}"'
