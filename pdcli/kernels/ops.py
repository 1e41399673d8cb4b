"""Attention ops used by the model: the CUDA kernels where they apply, else the torch reference."""
from __future__ import annotations

import functools

import torch

from pdcli.kernels import build, reference
from pdcli.models.context import Context

_HALF = (torch.bfloat16, torch.float16)


@functools.cache
def _kernels_for(device_type: str, dtype: torch.dtype, head_dim: int, group: int):
    if device_type != "cuda" or dtype not in _HALF or head_dim not in (64, 128) or group not in (1, 2, 4, 8):
        return None
    return build.get()


def kernel_module(q: torch.Tensor, k_cache: torch.Tensor):
    return _kernels_for(q.device.type, q.dtype, q.shape[-1], q.shape[1] // k_cache.shape[2])


def kernel_path(device: torch.device, dtype: torch.dtype, head_dim: int, group: int) -> str:
    """'cuda' when the compiled kernels serve this model, else 'reference'."""
    return "cuda" if _kernels_for(device.type, dtype, head_dim, group) is not None else "reference"


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    mod = kernel_module(k, k_cache)
    if mod is not None:
        mod.store_kvcache(k, v, k_cache, v_cache, slot_mapping)
    else:
        reference.store_kvcache(k, v, k_cache, v_cache, slot_mapping)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: Context, scale: float) -> torch.Tensor:
    mod = kernel_module(q, k_cache)
    if mod is not None and ctx.is_decode:
        out = torch.empty_like(q)
        mod.decode_attention(out, q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale, ctx.num_splits,
                             ctx.max_context_len)
        return out
    if mod is not None:
        out = torch.empty_like(q)
        mod.prefill_attention(out, q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, ctx.query_start_loc,
                              ctx.max_query_len, scale)
        return out
    return reference.paged_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, ctx.query_start_loc,
                                     ctx.max_query_len, ctx.max_context_len, scale)
