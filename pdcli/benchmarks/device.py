"""The GPU a benchmark runs on: its name as a file-name slug, CUDA-event timing, and its measured copy
bandwidth and matmul rate (the rooflines the benchmarks compare against)."""
from __future__ import annotations

import gc
import re
import statistics

import torch


def device_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def time_us(fn, iters: int = 30, warmup: int = 5) -> float:
    """Median of CUDA-event timings, in microseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    x = torch.randn(2**29 // 2, device="cuda", dtype=torch.bfloat16)  # 0.5 GiB... x2 below
    x = torch.cat([x, x])
    y = torch.empty_like(x)
    us = time_us(lambda: y.copy_(x), iters=20)
    return 2 * x.numel() * x.element_size() / (us * 1e-6)


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    us = time_us(lambda: a @ b, iters=10)
    return 2 * 8192**3 / (us * 1e-6)


def free_gpu() -> None:
    """Give back what a dropped engine's tensors held (between benchmark parts)."""
    gc.collect()
    torch.cuda.empty_cache()
