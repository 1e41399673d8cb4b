"""Pure-torch paged attention: the CPU path and the oracle every kernel is tested against."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    # k, v [T, Hk, D]; caches [num_blocks, block_size, Hk, D]; slot_mapping [T]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int,
                    max_context_len: int, scale: float) -> torch.Tensor:
    """Varlen causal attention of new tokens over their cached context (bottom-right aligned).

    q [T, Hq, D] holds each sequence's new tokens back to back (query_start_loc); sequence b's
    last query sits at position context_lens[b] - 1 and query i attends to keys 0..ctx - qlen + i.
    Returns [T, Hq, D].
    """
    num_tokens, num_heads, head_dim = q.shape
    block_size = k_cache.shape[1]
    device = q.device
    q_lens = query_start_loc[1:] - query_start_loc[:-1]  # [B]
    rows = torch.arange(max_query_len, device=device)
    tok = (query_start_loc[:-1, None] + rows[None]).clamp(max=num_tokens - 1).long()  # [B, Lq]
    q_valid = rows[None] < q_lens[:, None]  # [B, Lq]
    num_blocks = -(-max_context_len // block_size)
    tables = block_tables[:, :num_blocks].long()
    k = k_cache[tables].flatten(1, 2)[:, :max_context_len]  # [B, Lk, Hk, D]
    v = v_cache[tables].flatten(1, 2)[:, :max_context_len]
    cols = torch.arange(max_context_len, device=device)
    last = (context_lens - q_lens)[:, None] + rows[None]  # [B, Lq] last key each query may see
    mask = (cols[None, None] <= last[..., None]) & (cols[None, None] < context_lens[:, None, None])
    out = F.scaled_dot_product_attention(
        q[tok].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None],
        scale=scale, enable_gqa=k.shape[2] != num_heads)  # [B, Hq, Lq, D]
    return out.transpose(1, 2)[q_valid]
