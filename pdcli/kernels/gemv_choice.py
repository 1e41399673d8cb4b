"""Where the skinny matmul (csrc/gemv.cu) beats cuBLAS: decided per (rows, n, k) by timing both on this GPU
when an engine starts (`tune`), before its CUDA graphs are captured. A shape never timed keeps the kernel for
1-4 rows (the default before: it wins on most shapes, not on every one)."""
from __future__ import annotations

import logging
from typing import Callable

import torch

logger = logging.getLogger("pdcli.kernels")

ROWS = (1, 2, 3, 4)
_choice: dict[tuple[int, int, int], bool] = {}  # (rows, n, k) -> the skinny matmul is faster


def use_gemv(rows: int, n: int, k: int) -> bool:
    return _choice.get((rows, n, k), True)


def cuda_time_us(fn: Callable[[], object], iters: int = 20, warmup: int = 3) -> float:
    from pdcli.benchmarks.device import time_us

    return time_us(fn, iters=iters, warmup=warmup)


def linear_inputs(weights: list[torch.Tensor], rows, done: dict):
    """(m, n, k, x, w) for every distinct weight shape [n, k] and m of rows not yet in done, x a random [m, k]."""
    for w in {tuple(w.shape): w for w in weights}.values():
        n, k = w.shape
        for m in rows:
            if (m, n, k) not in done:
                yield m, n, k, torch.randn(m, k, dtype=w.dtype, device=w.device), w


def tune(weights: list[torch.Tensor], gemv: Callable, time_us: Callable = cuda_time_us) -> list[dict]:
    """Time gemv(y, x, w, None) against torch's linear for every distinct weight shape and 1-4 rows; record the
    faster. Rows: rows, n, k, gemv_us, cublas_us, path."""
    out = []
    for m, n, k, x, w in linear_inputs(weights, ROWS, _choice):
        y = torch.empty(m, n, dtype=w.dtype, device=w.device)
        ours = time_us(lambda: gemv(y, x, w, None))
        theirs = time_us(lambda: torch.nn.functional.linear(x, w))
        _choice[(m, n, k)] = ours < theirs
        out.append(dict(rows=m, n=n, k=k, gemv_us=ours, cublas_us=theirs, path="gemv" if ours < theirs else "cublas"))
    slower = [f"{r['rows']}x{r['n']}x{r['k']}" for r in out if r["path"] == "cublas"]
    if slower:
        logger.info("cuBLAS for %s: faster there than the skinny matmul", ", ".join(slower))
    return out
