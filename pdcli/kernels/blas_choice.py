"""cuBLAS's own pick or cuBLASLt per linear shape at the decode graphs' batch sizes (5-512 rows): decided by
timing both on this GPU when an engine starts (`tune`), before its CUDA graphs are captured (a captured graph
keeps the library it was captured with). On one H100 at 64 rows the down projection read 9% faster through
cuBLASLt and qkv / o slower (results/kernel_experiments/skinny_blas/h100.jsonl); other shapes level."""
from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch

from pdcli.kernels.gemv_choice import linear_inputs

logger = logging.getLogger("pdcli.kernels")

MARGIN = 0.97  # cuBLASLt only where it took at most this fraction of the default's time
_choice: dict[tuple[int, int, int], str | None] = {}  # (rows, n, k) -> "cublaslt" where it was faster, else None


def library(rows: int, n: int, k: int) -> str | None:
    """The BLAS library to prefer for x [rows, k] @ w [n, k]^T, or None: torch's default."""
    return _choice.get((rows, n, k))


@contextlib.contextmanager
def preferred(lib: str):
    """torch's preferred BLAS library set to lib inside, restored after (a process-wide setting)."""
    prev = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(lib)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(prev)


def cold_time_us(fn: Callable[[], object], iters: int = 8, warmup: int = 2) -> float:
    """Median of CUDA-event timings (us) of fn with L2 cleared before each (256 MB written): a decode step streams
    its weights from HBM, and qkv / o (33-50 MB) would otherwise stay in L2 between the calls."""
    import statistics

    scratch = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    times = []
    for i in range(warmup + iters):
        scratch.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        if i >= warmup:
            times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def tune(weights: list[torch.Tensor], rows: list[int], time_us: Callable = cold_time_us,
         prefer: Callable = preferred) -> list[dict]:
    """Time torch's linear with the default library and with cuBLASLt for every distinct weight shape and each
    of rows; record cuBLASLt where faster by MARGIN. Rows: rows, n, k, default_us, cublaslt_us, library."""
    out = []
    for m, n, k, x, w in linear_inputs(weights, rows, _choice):
        default = time_us(lambda: torch.nn.functional.linear(x, w))
        with prefer("cublaslt"):
            lt = time_us(lambda: torch.nn.functional.linear(x, w))
        lib = "cublaslt" if lt <= MARGIN * default else "default"
        _choice[(m, n, k)] = lib if lib == "cublaslt" else None
        out.append(dict(rows=m, n=n, k=k, default_us=default, cublaslt_us=lt, library=lib))
    lt_shapes = [f"{r['rows']}x{r['n']}x{r['k']}" for r in out if r["library"] == "cublaslt"]
    if lt_shapes:
        logger.info("cuBLASLt for %s: faster there than the default", ", ".join(lt_shapes))
    return out
