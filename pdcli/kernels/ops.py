"""Ops used by the model: the CUDA kernels where they apply, else the torch reference."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from pdcli import envs
from pdcli.kernels import blas_choice, build, chunk_sdpa, gemv_choice, prefill_choice, reference
from pdcli.models.context import Context

_HALF = (torch.bfloat16, torch.float16)


@functools.cache
def _kernels_for(device_type: str, dtype: torch.dtype, head_dim: int, group: int):
    if device_type != "cuda" or dtype not in _HALF or head_dim not in (64, 128) or not 1 <= group <= 8:
        return None
    return build.get()


# PDCLI_DECODE_SPLIT, read once per process (not per layer of every step); tests clear it when they change it
_decode_split = functools.cache(envs.decode_split)
_decode_persistent = functools.cache(envs.decode_persistent)


def kernel_module(q: torch.Tensor, k_cache: torch.Tensor):
    return _kernels_for(q.device.type, q.dtype, q.shape[-1], q.shape[1] // k_cache.shape[2])


def kernel_path(device: torch.device, dtype: torch.dtype, head_dim: int, group: int) -> str:
    """'cuda' when the compiled kernels serve this model, else 'reference'."""
    return "cuda" if _kernels_for(device.type, dtype, head_dim, group) is not None else "reference"


def _elementwise_module(x: torch.Tensor):
    if x.device.type != "cuda" or x.dtype not in _HALF or x.shape[-1] % 8:
        return None
    return build.get()


def copy_blocks(dst: torch.Tensor, src: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor) -> None:
    """dst[:, dst_idx] = src[:, src_idx] over [G, N, ...] block pools/buffers (KV handoff): the kernel on a
    GPU, else the reference."""
    mod = build.get() if src.is_cuda else None
    aligned = all(t.data_ptr() % 16 == 0 and t[0, 0].numel() * t.element_size() % 16 == 0 for t in (src, dst)) \
        if src.shape[1] and dst.shape[1] else False  # the kernel moves 16-byte words
    if mod is not None and aligned:
        mod.copy_blocks(dst, src, src_idx, dst_idx)
    else:
        reference.copy_blocks(dst, src, src_idx, dst_idx)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [m, k] @ weight [n, k]^T (+ bias): the gemv kernel for 1-4 rows where it beats cuBLAS on this GPU
    (kernels/gemv_choice.py) unless PDCLI_GEMV=0, else torch, or one of cuBLASLt's algorithms at the shapes and
    decode batch sizes where that was timed faster (kernels/blas_choice.py)."""
    mode = envs.gemv_mode() if x.dim() == 2 and 1 <= x.shape[0] <= 4 and weight.is_contiguous() else "off"
    if mode == "always" or (mode == "tuned" and gemv_choice.use_gemv(x.shape[0], weight.shape[0], weight.shape[1])):
        mod = _elementwise_module(x)
        if mod is not None and x.stride(-1) == 1:
            y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
            mod.gemv(y, x, weight, bias)
            return y
    algo = blas_choice.algo(x.shape[0], weight.shape[0], weight.shape[1]) if x.dim() == 2 and bias is None else None
    if algo is not None and blas_choice.usable(x, weight):
        return blas_choice.linear(x, weight, algo)
    return F.linear(x, weight, bias)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, dim=-1) of logits [rows, V]: greedy sampling's reduction, by the kernel on a GPU (parts
    of every row at once: torch's ran one CTA a row), else torch's."""
    mod = build.get() if logits.is_cuda and logits.dim() == 2 else None
    if (mod is not None and logits.dtype in (torch.bfloat16, torch.float16, torch.float32) and logits.stride(-1) == 1
            and logits.data_ptr() % 16 == 0 and logits.stride(0) * logits.element_size() % 16 == 0
            and 0 < logits.shape[0] <= 65535 and logits.shape[1] > 0):
        return mod.argmax(logits)
    return logits.argmax(dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    mod = _elementwise_module(x)
    if mod is None or x.dim() != 2 or x.stride(-1) != 1:
        return reference.rms_norm(x, weight, eps)
    out = torch.empty_like(x)
    mod.rms_norm(out, x, weight, eps)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual); the kernel works in place on x and residual."""
    mod = _elementwise_module(x)
    if mod is None or x.dim() != 2 or not x.is_contiguous() or not residual.is_contiguous():
        return reference.fused_add_rms_norm(x, residual, weight, eps)
    mod.fused_add_rms_norm(x, residual, weight, eps)
    return x, residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    mod = _elementwise_module(x)
    if mod is None or x.dim() != 2 or x.stride(-1) != 1:
        return reference.silu_and_mul(x)
    out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype, device=x.device)
    mod.silu_and_mul(out, x)
    return out


def qkv_rope_store(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int) -> torch.Tensor:
    """q [T, Hq, D] after norm + rotary; k and v go to their cache slots (see reference.qkv_rope_store)."""
    head_dim = k_cache.shape[3]
    mod = _kernels_for(qkv.device.type, qkv.dtype, head_dim, num_heads // k_cache.shape[2])
    if mod is None:
        return reference.qkv_rope_store(qkv, positions, cos, sin, q_norm, k_norm, eps, k_cache, v_cache,
                                        slot_mapping, num_heads)
    q = torch.empty(qkv.shape[0], num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    mod.qkv_rope_store(q, qkv, positions, cos, sin, q_norm, k_norm, eps, k_cache, v_cache, slot_mapping)
    return q


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: Context, scale: float) -> torch.Tensor:
    mod = kernel_module(q, k_cache)
    if mod is not None and ctx.is_decode:
        out = torch.empty_like(q)
        decode_fn(mod, ctx)(out, q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale, ctx.num_splits,
                            ctx.max_context_len)
        return out
    if mod is not None and ctx.block_tables.shape[0] == 1 and ctx.max_context_len == ctx.max_query_len == q.shape[0]:
        return fresh_prefill_attention(q, k_cache, v_cache, ctx.block_tables[0], scale)
    if mod is not None and envs.prefill_kernel() == "auto" and prefill_choice.chunk_sdpa_on() and chunk_sdpa.applies(
            ctx.block_tables.shape[0], ctx.num_decode_seqs > 0, q.shape[0], ctx.max_context_len):
        return chunk_sdpa.chunk_attention(q, k_cache, v_cache, ctx.block_tables[0], ctx.max_context_len - q.shape[0],
                                          scale)
    if mod is not None:
        return split_attention(q, ctx, decode_fn(mod, ctx), prefill_kernel(mod, q.shape[-1], ctx.max_query_len),
                               k_cache, v_cache, scale)
    if ctx.prefill_query_start_loc is not None:  # decodes and prompts apart: no decode row padded to a chunk
        return split_attention(q, ctx, reference_decode, reference_prefill, k_cache, v_cache, scale)
    return reference.paged_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, ctx.query_start_loc,
                                     ctx.max_query_len, ctx.max_context_len, scale)


def prefill_kernel_name(mod, head_dim: int, max_query_len: int) -> str:
    """The paged prefill attention kernel for this chunk length: envs.prefill_kernel ("auto": prefill_choice's),
    the wgmma ones only where this build has them, else "mma"."""
    kernel = envs.prefill_kernel()
    if kernel == "auto":
        kernel = prefill_choice.kernel_for(max_query_len)
    return kernel if kernel != "mma" and mod.has_prefill_attention_wgmma(head_dim) else "mma"


def prefill_kernel_fn(mod, name: str):
    """The compiled paged prefill attention called `name` ("mma", "wgmma", "wgmma_ws", "wgmma_tma")."""
    return mod.prefill_attention if name == "mma" else getattr(mod, f"prefill_attention_{name}")


def prefill_kernel(mod, head_dim: int, max_query_len: int):
    """The compiled paged prefill attention to use (prefill_kernel_name's)."""
    return prefill_kernel_fn(mod, prefill_kernel_name(mod, head_dim, max_query_len))


def decode_fn(mod, ctx: Context):
    """The decode kernel in its own signature (out, q, k, v, tables, lens, scale, splits, max_ctx): by default
    (and with splits 0: the kernel's choice) balanced over key counts by a plan that ctx's first decode call makes
    (one per step: ctx has one set of decode rows) and the rest reuse; uniform split-KV with
    PDCLI_DECODE_SPLIT=uniform or a given number of splits."""
    if _decode_split() != "balanced":
        return mod.decode_attention

    def planned(out, q, k_cache, v_cache, tables, lens, scale, splits, max_ctx) -> None:
        if splits:
            mod.decode_attention(out, q, k_cache, v_cache, tables, lens, scale, splits, max_ctx)
            return
        first = ctx.decode_plan is None
        if first:
            ctx.decode_plan = mod.decode_plan(lens, *decode_plan_target(mod, k_cache.shape[2], q.shape[-1]))
            ctx.decode_counters = torch.zeros(len(lens) * k_cache.shape[2], dtype=torch.int32, device=lens.device)
        mod.decode_attention_planned(out, q, k_cache, v_cache, tables, lens, scale, ctx.decode_plan,
                                     ctx.decode_counters, not first, _decode_persistent())

    return planned


# keys per part at least (the uniform split's kMinSplitKeys): a short batch's sequences stay whole
DECODE_PLAN_MIN_CHUNK = 256


def decode_plan_target(mod, num_kv_heads: int, head_dim: int) -> tuple[int, int]:
    """(parts per kv head, least keys per part) of a step's balanced plan: one wave of the kernel's resident CTAs.
    On one H100 (results/decode_mixed_nvidia-h100-80gb-hbm3.json) one wave was within 9% of the best of 1/2/4 waves
    and the uniform split's CTA count in every case; a target of the uniform count took 0.94-1.53x its time."""
    return max(1, mod.decode_attention_resident_ctas(head_dim) // num_kv_heads), DECODE_PLAN_MIN_CHUNK


def reference_decode(out, q, k_cache, v_cache, tables, lens, scale, splits, max_ctx) -> None:
    """The reference in the decode kernel's signature (one query row per sequence)."""
    qsl = torch.arange(len(lens) + 1, dtype=torch.int32, device=q.device)
    out.copy_(reference.paged_attention(q, k_cache, v_cache, tables, lens, qsl, 1, int(lens.max()), scale))


def reference_prefill(out, q, k_cache, v_cache, tables, lens, qsl, max_q, scale) -> None:
    """The reference in the prefill kernel's signature."""
    out.copy_(reference.paged_attention(q, k_cache, v_cache, tables, lens, qsl, max_q, int(lens.max()), scale))


# a whole prompt's SDPA runs at its length rounded up to this (tokens): cuDNN builds an execution graph for every
# new shape (tens of ms each on an H100), which prompts of many lengths met again and again
FRESH_PREFILL_BUCKET = 256


def fresh_prefill_len(t: int) -> int:
    """The length a whole prompt of t tokens is attended at (fresh_prefill_attention)."""
    return -(-t // FRESH_PREFILL_BUCKET) * FRESH_PREFILL_BUCKET


def fresh_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """Causal attention of one sequence with no cached prefix (a whole prompt): its K/V rows are gathered from
    the cache, then torch's SDPA (cuDNN / FlashAttention on Hopper) runs it, faster than the paged kernel when
    there is no prefix to page through (H100, 8k tokens: ~600 against ~330 TFLOP/s). Rows are zero-padded at the
    end to fresh_prefill_len, so a serving process meets few shapes: causally, a real row sees no padded key.
    q [T, Hq, D] -> [T, Hq, D]."""
    t = q.shape[0]
    blocks = block_table[: -(-t // k_cache.shape[1])]
    k = k_cache[blocks].flatten(0, 1)[:t]  # [T, Hk, D]
    v = v_cache[blocks].flatten(0, 1)[:t]
    pad = fresh_prefill_len(t) - t
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         is_causal=True, scale=scale, enable_gqa=True)
    return out[0, :, :t].transpose(0, 1)


def split_attention(q: torch.Tensor, ctx: Context, decode_fn, prefill_fn, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """A mixed step: its leading ctx.num_decode_seqs one-token rows go to decode_fn (the GQA decode kernel reads
    each K/V row once for all query heads of a kv head), the rest to prefill_fn. Signatures as the kernels':
    decode_fn(out, q, k, v, tables, lens, scale, splits, max_ctx), prefill_fn(out, q, k, v, tables, lens, qsl,
    max_q, scale), each writing into its slice of out [T, Hq, D]."""
    out = torch.empty_like(q)
    nd = ctx.num_decode_seqs
    if ctx.prefill_query_start_loc is None:  # not both kinds of rows
        prefill_fn(out, q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, ctx.query_start_loc,
                   ctx.max_query_len, scale)
        return out
    decode_fn(out[:nd], q[:nd], k_cache, v_cache, ctx.block_tables[:nd], ctx.context_lens[:nd], scale, 0,
              ctx.max_context_len)
    prefill_fn(out[nd:], q[nd:], k_cache, v_cache, ctx.block_tables[nd:], ctx.context_lens[nd:],
               ctx.prefill_query_start_loc, ctx.max_query_len, scale)
    return out
