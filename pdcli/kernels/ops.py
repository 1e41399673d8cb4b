"""Attention ops used by the model: the CUDA kernels where built, else the torch reference."""
from __future__ import annotations

import torch

from pdcli.kernels import reference
from pdcli.models.context import Context


def kernel_path() -> str:
    return "reference"


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    reference.store_kvcache(k, v, k_cache, v_cache, slot_mapping)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: Context, scale: float) -> torch.Tensor:
    return reference.paged_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, ctx.query_start_loc,
                                     ctx.max_query_len, ctx.max_context_len, scale)
