"""Pure-torch paged attention: the CPU path and the oracle every kernel is tested against."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    # k, v [T, Hk, D]; caches [num_blocks, block_size, Hk, D]; slot_mapping [T]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def copy_blocks(dst: torch.Tensor, src: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor) -> None:
    """dst [G, Nd, ...][:, dst_idx] = src [G, Ns, ...][:, src_idx] (contiguous, one dtype). Blocks move as
    8-byte words when they can: torch's index kernels copy one element per thread."""
    words = (src[0, 0].numel() * src.element_size()) % 8 == 0 if src.shape[1] else False
    s = src.reshape(*src.shape[:2], -1)
    d = dst.reshape(*dst.shape[:2], -1)
    if words:
        s, d = s.view(torch.int64), d.view(torch.int64)
    d.index_copy_(1, dst_idx, s.index_select(1, src_idx))


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


def paged_attention_fp32_chunked(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, context_lens: torch.Tensor,
                                 query_start_loc: torch.Tensor, scale: float, chunk: int = 128) -> torch.Tensor:
    """paged_attention in fp32, per sequence and per `chunk` queries: memory chunk x context x heads, not
    context^2 (a 32k-token prompt's check fits where the math path's SDPA would ask for 128 GiB). fp32 [T, Hq, D]."""
    hq, hk, d = q.shape[1], k_cache.shape[2], q.shape[2]
    g, block_size = hq // hk, k_cache.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b in range(context_lens.shape[0]):
        q0, q1, ctx = int(query_start_loc[b]), int(query_start_loc[b + 1]), int(context_lens[b])
        qlen = q1 - q0
        table = block_tables[b, :-(-ctx // block_size)].long()
        k = k_cache[table].flatten(0, 1)[:ctx].float()  # [ctx, Hk, D]
        v = v_cache[table].flatten(0, 1)[:ctx].float()
        for i0 in range(0, qlen, chunk):
            i1 = min(qlen, i0 + chunk)
            seen = ctx - qlen + i1  # keys the chunk's last query sees
            qc = q[q0 + i0:q0 + i1].float().view(i1 - i0, hk, g, d)
            s = torch.einsum("qhgd,khd->hgqk", qc, k[:seen]) * scale  # [Hk, G, c, seen]
            last = ctx - qlen + torch.arange(i0, i1, device=q.device)  # each query's last visible key
            s.masked_fill_(torch.arange(seen, device=q.device)[None] > last[:, None], float("-inf"))
            o = torch.einsum("hgqk,khd->qhgd", s.softmax(dim=-1), v[:seen])
            out[q0 + i0:q0 + i1] = o.reshape(i1 - i0, hq, d)
    return out


def merge_attn_states(a: torch.Tensor, la: torch.Tensor, b: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """a, b [H, T, D]: attention outputs of the same queries over disjoint key sets; la, lb [H, T]: their rows'
    natural log-sum-exps -> the attention over both key sets, [T, H, D] in a's dtype (fp32 math)."""
    m = torch.maximum(la, lb)
    wa, wb = torch.exp(la - m)[..., None], torch.exp(lb - m)[..., None]
    out = (a.float() * wa + b.float() * wb) / (wa + wb)
    return out.transpose(0, 1).contiguous().to(a.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x [..., dim]: statistics in fp32, then back to x's dtype before the weight (as HF does)
    dtype = x.dtype
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual); the sum is rounded to the dtype first."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    # x [T, 2 d] = [gate | up] -> [T, d]
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def qkv_rope_store(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Split the packed projection, per-head RMSNorm q and k (Qwen3), rotate them (GPT-NeoX halves),
    store k and v in their cache slots; returns q [T, Hq, D].

    qkv [T, (Hq + 2 Hk) D]; positions, slot_mapping [T]; cos, sin [max_pos, D] fp32."""
    num_tokens = qkv.shape[0]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.view(num_tokens, num_heads, head_dim)
    k = k.view(num_tokens, num_kv_heads, head_dim)
    v = v.view(num_tokens, num_kv_heads, head_dim)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    c = cos[positions].unsqueeze(1).to(q.dtype)
    s = sin[positions].unsqueeze(1).to(q.dtype)
    q, k = q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    store_kvcache(k, v, k_cache, v_cache, slot_mapping)
    return q
