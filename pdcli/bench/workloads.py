"""Request length distributions. Prompts are random token ids of the drawn length (no re-tokenization)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

WORKLOADS = {
    "short": "prompt ~ U[64, 256], output 128 (nanoPD's short)",
    "long": "prompt ~ U[1024, 2048], output 128 (nanoPD's long)",
    "mixed": "short or long with probability 1/2 each, output 128 (nanoPD's mixed)",
    "random": "vLLM's random: input and output uniform in [L(1-r), L(1+r)]",
    "sharegpt-like": "log-normal prompt (median 256, sigma 1) and output (median 192, sigma 0.8), clipped",
}


@dataclass
class BenchRequest:
    prompt_ids: list[int]
    output_len: int


def make_requests(workload: str, num: int, seed: int, vocab_size: int, max_model_len: int, input_len: int = 1024,
                  output_len: int = 128, range_ratio: float = 0.0) -> list[BenchRequest]:
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}: {', '.join(WORKLOADS)}")
    rng = np.random.default_rng(seed)
    lo_id, hi_id = min(3, vocab_size - 1), vocab_size
    reqs = []
    for _ in range(num):
        if workload == "short" or (workload == "mixed" and rng.random() < 0.5):
            n, o = int(rng.integers(64, 257)), 128
        elif workload in ("long", "mixed"):
            n, o = int(rng.integers(1024, 2049)), 128
        elif workload == "random":
            n = int(rng.integers(math.floor(input_len * (1 - range_ratio)), math.ceil(input_len * (1 + range_ratio)) + 1))
            o = int(rng.integers(math.floor(output_len * (1 - range_ratio)), math.ceil(output_len * (1 + range_ratio)) + 1))
        else:
            n = int(np.clip(rng.lognormal(math.log(256), 1.0), 8, 8192))
            o = int(np.clip(rng.lognormal(math.log(192), 0.8), 4, 2048))
        n = max(1, min(n, max_model_len - 2))
        o = max(1, min(o, max_model_len - n - 1))
        reqs.append(BenchRequest(rng.integers(lo_id, hi_id, n).tolist(), o))
    return reqs
