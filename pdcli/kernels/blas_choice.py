"""torch's default matmul or one of cuBLASLt's own algorithms per linear shape at the decode graphs' batch sizes:
decided by timing each on this GPU when an engine starts (`tune`), before its CUDA graphs are captured (a graph
keeps the kernel it was captured with). cuBLAS picks one kernel per shape; cuBLASLt's heuristic offers others
(tile shapes, split-K or not: csrc/lt_matmul.cpp). Each candidate's output is checked against the default's
before it is timed; each is timed over several layers' weights in turn, as a decode step streams them."""
from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger("pdcli.kernels")

MARGIN = 0.97  # a cuBLASLt algorithm only where it took at most this fraction of the default's time
MAX_ALGOS = 8  # candidates asked of the heuristic per shape
WORKSPACE_BYTES = 32 << 20  # per device, shared by every call (one stream runs the decode graphs)
STREAM_WEIGHTS = 8  # distinct weights of a shape per timed pass: more than L2 holds for every shape timed


@dataclass(frozen=True)
class Algo:
    index: int  # rank in the heuristic's list
    blob: torch.Tensor  # uint8 [sizeof(cublasLtMatmulAlgo_t)] on the CPU: the opaque algorithm


_choice: dict[tuple[int, int, int], Algo | None] = {}  # (rows, n, k) -> the algorithm timed faster, else None
_workspace: dict[torch.device, torch.Tensor] = {}
_module = None  # the cuBLASLt extension (kernels/build.load_lt), set by tune


def algo(rows: int, n: int, k: int) -> Algo | None:
    """The cuBLASLt algorithm for x [rows, k] @ w [n, k]^T, or None: torch's default."""
    return _choice.get((rows, n, k))


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Inputs the chosen algorithms were timed for: contiguous, 16-byte aligned, half precision."""
    return (x.dtype in (torch.bfloat16, torch.float16) and x.is_contiguous() and w.is_contiguous()
            and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0)


def linear(x: torch.Tensor, w: torch.Tensor, a: Algo, module=None) -> torch.Tensor:
    """x @ w^T through algorithm a."""
    mod = module or _module
    y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    if x.device not in _workspace:
        _workspace[x.device] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=x.device)
    mod.lt_linear(y, x, w, a.blob, _workspace[x.device])
    return y


def stream_time_us(call: Callable[[torch.Tensor], object], weights: list[torch.Tensor], iters: int = 5,
                   warmup: int = 1) -> float:
    """Median over passes of the CUDA-event time (us) of call(w) for each of weights in turn, per call."""
    times = []
    for i in range(warmup + iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for w in weights:
            call(w)
        b.record()
        b.synchronize()
        if i >= warmup:
            times.append(a.elapsed_time(b) * 1e3 / len(weights))
    return statistics.median(times)


def agrees(y: torch.Tensor, ref: torch.Tensor) -> bool:
    """Within bf16 rounding of the default's result (a different summation order)."""
    return bool(torch.isfinite(y).all()) and (y.float() - ref.float()).abs().max().item() <= \
        1e-2 * ref.float().abs().max().item() + 1e-3


def tune(weights: list[torch.Tensor], rows: list[int], module, time_us: Callable = stream_time_us) -> list[dict]:
    """Time torch's linear and each cuBLASLt candidate that agrees with it, for every distinct weight shape and
    each of rows; record the fastest candidate where it beats the default by MARGIN. Rows of the result: rows, n,
    k, default_us, algos_us (None where it disagreed), algo (index or None), library."""
    global _module
    _module = module
    by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
    for w in weights:
        by_shape.setdefault(tuple(w.shape), [])
        if len(by_shape[tuple(w.shape)]) < STREAM_WEIGHTS:
            by_shape[tuple(w.shape)].append(w)
    out = []
    for (n, k), ws in by_shape.items():
        for m in rows:
            if (m, n, k) not in _choice:
                out.append(_tune_one(m, n, k, ws, module, time_us))
    chosen = [f"{r['rows']}x{r['n']}x{r['k']} (#{r['algo']})" for r in out if r["algo"] is not None]
    if chosen:
        logger.info("cuBLASLt algorithms for %s: faster there than the default", ", ".join(chosen))
    return out


def _tune_one(m: int, n: int, k: int, ws: list[torch.Tensor], module, time_us: Callable) -> dict:
    x = torch.randn(m, k, dtype=ws[0].dtype, device=ws[0].device)
    ref = F.linear(x, ws[0])
    default = time_us(lambda w: F.linear(x, w), ws)
    blobs, _ = module.lt_algos(m, n, k, k, x.dtype == torch.bfloat16, MAX_ALGOS, WORKSPACE_BYTES)
    best, best_us, algos_us = None, MARGIN * default, []
    for i in range(blobs.shape[0]):
        a = Algo(i, blobs[i].contiguous())  # its workspace fits WORKSPACE_BYTES (asked so)
        if not agrees(linear(x, ws[0], a, module), ref):
            logger.warning("cuBLASLt algorithm #%d for %dx%dx%d disagrees with the default: not used", i, m, n, k)
            algos_us.append(None)
            continue
        us = time_us(lambda w, a=a: linear(x, w, a, module), ws)
        algos_us.append(us)
        if us <= best_us:
            best, best_us = a, us
    _choice[(m, n, k)] = best
    return dict(rows=m, n=n, k=k, default_us=default, algos_us=algos_us, algo=best.index if best else None,
                library="cublaslt" if best else "default")
