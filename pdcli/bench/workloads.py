"""Request length distributions. Prompts are random token ids of the drawn length (no re-tokenization)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SHARED_PREFIXES, SHARED_PREFIX_LEN = 8, 2048  # shared-prefix: the system prompts requests start with

WORKLOADS = {
    "short": "prompt ~ U[64, 256], output 128 (nanoPD's short)",
    "long": "prompt ~ U[1024, 2048], output 128 (nanoPD's long)",
    "mixed": "short or long with probability 1/2 each, output 128 (nanoPD's mixed)",
    "random": "vLLM's random: input and output uniform in [L(1-r), L(1+r)]",
    "sharegpt-like": "log-normal prompt (median 256, sigma 1) and output (median 192, sigma 0.8), clipped",
    "bimodal": "90% short (prompt 256, output 256), 10% long (prompt ~ U[8192, 12288], output 128)",
    "shared-prefix": f"{SHARED_PREFIXES} system prompts of {SHARED_PREFIX_LEN} tokens, one of them (uniform) before "
                     "each request's own U[64, 256] tokens, output 128",
}


@dataclass
class BenchRequest:
    prompt_ids: list[int]
    output_len: int


def make_requests(workload: str, num: int, seed: int, vocab_size: int, max_model_len: int, input_len: int = 1024,
                  output_len: int = 128, range_ratio: float = 0.0, as_arrays: bool = False) -> list[BenchRequest]:
    """as_arrays: each prompt's ids as an int64 array, not a list (the same draws; the planner's simulator reads
    only lengths and block hashes, and 15k lists of 1k ids take a second to build)."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}: {', '.join(WORKLOADS)}")
    rng = np.random.default_rng(seed)
    lo_id, hi_id = min(3, vocab_size - 1), vocab_size
    prefixes = [rng.integers(lo_id, hi_id, min(SHARED_PREFIX_LEN, max_model_len // 2)).tolist()
                for _ in range(SHARED_PREFIXES)] if workload == "shared-prefix" else []
    reqs = []
    for _ in range(num):
        prefix = prefixes[int(rng.integers(len(prefixes)))] if prefixes else []
        n, o = _lengths(workload, rng, input_len, output_len, range_ratio)
        n = max(1, min(n, max_model_len - 2 - len(prefix)))
        o = max(1, min(o, max_model_len - len(prefix) - n - 1))
        ids = rng.integers(lo_id, hi_id, n)
        if as_arrays:
            reqs.append(BenchRequest(np.concatenate([np.asarray(prefix, dtype=ids.dtype), ids]), o))
        else:
            reqs.append(BenchRequest(prefix + ids.tolist(), o))
    return reqs


def _lengths(workload: str, rng, input_len: int, output_len: int, range_ratio: float) -> tuple[int, int]:
    """(prompt tokens, output tokens) of one request; for shared-prefix, the tokens after its system prompt."""
    if workload == "bimodal":
        return (256, 256) if rng.random() < 0.9 else (int(rng.integers(8192, 12289)), 128)
    if workload == "shared-prefix":
        return int(rng.integers(64, 257)), 128
    if workload == "short" or (workload == "mixed" and rng.random() < 0.5):
        return int(rng.integers(64, 257)), 128
    if workload in ("long", "mixed"):
        return int(rng.integers(1024, 2049)), 128
    if workload == "random":
        n = int(rng.integers(math.floor(input_len * (1 - range_ratio)), math.ceil(input_len * (1 + range_ratio)) + 1))
        o = int(rng.integers(math.floor(output_len * (1 - range_ratio)), math.ceil(output_len * (1 + range_ratio)) + 1))
        return n, o
    return int(np.clip(rng.lognormal(math.log(256), 1.0), 8, 8192)), int(np.clip(rng.lognormal(math.log(192), 0.8), 4, 2048))
