"""The per-shape kernel choices an engine times on its GPU when it starts (before any CUDA graph is captured):
the skinny matmul or cuBLAS per linear shape (gemv_choice), torch's default matmul or a cuBLASLt algorithm per linear
shape and decode batch size (blas_choice), the paged prefill attention kernel per chunk length (prefill_choice,
PDCLI_PREFILL_KERNEL=auto). A timing failure leaves the defaults, never the engine down."""
from __future__ import annotations

import logging

import torch

from pdcli import envs
from pdcli.kernels import build

logger = logging.getLogger("pdcli.engine")


def tune_gemv(model: torch.nn.Module) -> list[dict]:
    """The skinny matmul or cuBLAS per linear shape at 1-4 rows."""
    from pdcli.kernels import gemv_choice

    mod = build.get()
    if mod is None or envs.gemv_mode() != "tuned":
        return []
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        return gemv_choice.tune(weights, mod.gemv)
    except Exception as err:
        logger.warning("skinny-matmul timing failed (%s): kernel for 1-4 rows", err)
        return []


def tune_blas(model: torch.nn.Module, rows: list[int]) -> list[dict]:
    """torch's default matmul or a cuBLASLt algorithm per linear shape at the decode graphs' batch sizes."""
    from pdcli.kernels import blas_choice

    if not envs.blas_choice():
        return []
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        return blas_choice.tune(weights, rows, build.load_lt())
    except Exception as err:  # e.g. the cuBLASLt extension did not build
        logger.warning("cuBLASLt algorithm timing failed (%s): torch's default matmul", err)
        return []


def tune_prefill(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                 device) -> list[dict]:
    """PDCLI_PREFILL_KERNEL=auto: the paged prefill kernel per chunk length (this rank's heads)."""
    from pdcli.kernels import prefill_choice
    from pdcli.kernels.ops import prefill_kernel_fn

    mod = build.get()
    if mod is None or envs.prefill_kernel() != "auto":
        return []
    if not mod.has_prefill_attention_wgmma(head_dim):
        return []  # mma.sync is the only one: nothing to choose
    kernels = {n: prefill_kernel_fn(mod, n) for n in ("mma", "wgmma", "wgmma_ws", "wgmma_tma")}
    try:
        rows = prefill_choice.tune(kernels, num_heads, num_kv_heads, head_dim, block_size, dtype, device)
    except Exception as err:
        logger.warning("prefill kernel timing failed (%s): mma.sync", err)
        return []
    try:
        paged = kernels[prefill_choice.kernel_for(prefill_choice.CHUNK_SDPA_SHAPE[0])]
        rows.append(prefill_choice.tune_chunk_sdpa(paged, num_heads, num_kv_heads, head_dim, block_size, dtype,
                                                   device))
    except Exception as err:  # e.g. a torch without cuDNN's attention op: the paged kernel
        logger.warning("long-prompt chunks through SDPA not timed (%s): the paged kernel", err)
    return rows
