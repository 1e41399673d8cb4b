"""A long prompt's later chunks through torch's SDPA (cuDNN on Hopper) instead of the paged kernel: the chunk's
queries against the gathered prefix (not causal) and against themselves (causal), each with its log-sum-exp,
merged. Only where a chunk starts at a multiple of PREFIX_ALIGN tokens of one sequence with no decode rows beside
it (a prefill worker's or a lone prompt's chunks at the full token budget), so that cuDNN, which builds a graph
per shape, meets few shapes; used where it was timed faster than the paged kernel and matched the reference when
the engine started (prefill_choice.tune_chunk_sdpa)."""
from __future__ import annotations

import torch

PREFIX_ALIGN = 8192  # tokens: a chunk's prefix length must be a multiple of this
CHUNK_ALIGN = 256  # tokens: a chunk's queries are zero-padded to a multiple of this
# cuDNN's private op given the K/V heads as they are (fewer than the query heads), not repeated to them: set by
# prefill_choice.tune_chunk_sdpa where that call matched the reference
_grouped: list[bool] = [False]


def set_grouped(on: bool) -> None:
    _grouped[0] = on


def grouped() -> bool:
    return _grouped[0]


def applies(num_seqs: int, has_decode_rows: bool, q_len: int, context_len: int) -> bool:
    """Whether a step's attention may take this path: one sequence, no decode rows, a prefix of a multiple of
    PREFIX_ALIGN before its q_len new tokens."""
    prefix = context_len - q_len
    return num_seqs == 1 and not has_decode_rows and prefix > 0 and prefix % PREFIX_ALIGN == 0


def _expand(k: torch.Tensor, group: int) -> torch.Tensor:
    return k if group == 1 else k.repeat_interleave(group, dim=1)


def sdpa_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [1, Hq, T, D], k / v [1, Hk, S, D] -> (out [1, Hq, T, D], natural log-sum-exp of each row's scores
    [1, Hq, T] in fp32): cuDNN's SDPA on a GPU, the CPU's flash kernel elsewhere, with the K/V heads repeated to the
    query heads unless grouped() (torch does not check a grouped call to the private ops: the tuning does)."""
    group = q.shape[1] // k.shape[1]
    if q.is_cuda:
        if not _grouped[0]:
            k, v = _expand(k, group), _expand(v, group)
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    else:
        res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, _expand(k, group), _expand(v, group),
                                                                          0.0, causal, scale=scale)
    out, lse = res[0], res[1]
    return out, lse.reshape(q.shape[:3]).float()


def chunk_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    prefix: int, scale: float) -> torch.Tensor:
    """q [T, Hq, D], the chunk's new tokens after `prefix` cached ones of one sequence whose K/V (the chunk's
    too) are in the cache through block_table -> [T, Hq, D]. The chunk's rows are zero-padded to CHUNK_ALIGN
    (a padded query's row is dropped; a padded key comes after every real row, which the causal part never sees)."""
    t = q.shape[0]
    bs = k_cache.shape[1]
    blocks = block_table[: -(-(prefix + t) // bs)]
    k = k_cache[blocks].flatten(0, 1)[: prefix + t]  # [prefix + T, Hk, D]
    v = v_cache[blocks].flatten(0, 1)[: prefix + t]
    pad = -(-t // CHUNK_ALIGN) * CHUNK_ALIGN - t
    pad_rows = lambda x: torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x  # noqa: E731
    heads = lambda x: x.transpose(0, 1)[None]  # noqa: E731  [S, H, D] -> [1, H, S, D]
    qh = heads(pad_rows(q))
    o_pre, lse_pre = sdpa_lse(qh, heads(k[:prefix]), heads(v[:prefix]), False, scale)
    o_own, lse_own = sdpa_lse(qh, heads(pad_rows(k[prefix:])), heads(pad_rows(v[prefix:])), True, scale)
    return merge(o_pre[0, :, :t], lse_pre[0, :, :t], o_own[0, :, :t], lse_own[0, :, :t])


def merge(a: torch.Tensor, la: torch.Tensor, b: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """a, b [H, T, D]: outputs of the same queries over disjoint keys; la, lb [H, T] fp32 their log-sum-exps ->
    [T, H, D] contiguous: the CUDA kernel (one pass) where the build has it and the layout suits, else
    reference.merge_attn_states."""
    from pdcli.kernels import build, reference

    mod = build.get() if a.is_cuda else None
    if mod is not None and a.stride(-1) == 1 and b.stride(-1) == 1 and \
            all(x.stride(i) % 8 == 0 for x in (a, b) for i in (0, 1)):
        out = torch.empty(a.shape[1], a.shape[0], a.shape[2], dtype=a.dtype, device=a.device)
        mod.merge_attn_states(out, a, la, b, lb)
        return out
    return reference.merge_attn_states(a, la, b, lb)
