"""Open-loop arrival times: gamma inter-arrival gaps (Poisson at burstiness 1), as `vllm bench serve`."""
from __future__ import annotations

import math

import numpy as np


def arrival_times(num: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Seconds from the start at which each request is sent; rate inf sends all at 0."""
    if num <= 0:
        return np.zeros(0)
    if math.isinf(rate):
        return np.zeros(num)
    if rate <= 0 or burstiness <= 0:
        raise ValueError("arrival rate and burstiness must be positive")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num)
    gaps[0] = 0.0  # the first request opens the run
    return np.cumsum(gaps)
