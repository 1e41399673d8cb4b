"""Which paged prefill attention kernel runs a step (PDCLI_PREFILL_KERNEL=auto): on Hopper the mma.sync kernel,
the wgmma one or its warp-specialised variant, decided when an engine starts (`tune`) per chunk-length bucket
by timing each on this GPU, among those whose output matched the reference on a check case first (a kernel
that fails it is never used). Without a decision: mma.sync."""
from __future__ import annotations

import bisect
import logging
from typing import Callable

import torch

from pdcli.kernels import reference

logger = logging.getLogger("pdcli.kernels")

# (new tokens per sequence, cached tokens before them) timed per bucket; a step takes the bucket of its
# max_query_len: <= 256, <= 1024, <= 4096, longer
SHAPES = ((256, 0), (1024, 1024), (4096, 4096), (8192, 8192))
_choice: list[str] = []  # kernel name per SHAPES bucket, once tuned
_chunk_sdpa: list[bool] = [False]  # a long prompt's aligned later chunks through SDPA (chunk_sdpa), once tuned
_chunk_sdpa_row: list[dict] = [{}]  # the last tune_chunk_sdpa's row (for the benchmarks to report)
CHUNK_SDPA_SHAPE = (8192, 8192)  # (new tokens, prefix) timed against the paged kernel's choice for it


def chunk_sdpa_on() -> bool:
    return _chunk_sdpa[0]


def chunk_sdpa_row() -> dict:
    return dict(_chunk_sdpa_row[0])


def kernel_for(max_query_len: int) -> str:
    if not _choice:
        return "mma"
    return _choice[min(bisect.bisect_left([q for q, _ in SHAPES], max_query_len), len(_choice) - 1)]


def cuda_time_us(fn: Callable[[], object]) -> float:
    from pdcli.benchmarks.device import time_us

    return time_us(fn, iters=10, warmup=2)


def paged_case(q_len: int, prefix: int, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
               dtype: torch.dtype, device) -> tuple:
    """One sequence of q_len new tokens after `prefix` cached ones, its blocks shuffled in a pool: (q, k_cache,
    v_cache, block_tables, context_lens, query_start_loc)."""
    gen = torch.Generator(device=device).manual_seed(q_len + prefix)
    ctx = q_len + prefix
    blocks = -(-ctx // block_size)
    k_cache = torch.randn(blocks + 1, block_size, num_kv_heads, head_dim, generator=gen, device=device).to(dtype)
    v_cache = torch.randn(blocks + 1, block_size, num_kv_heads, head_dim, generator=gen, device=device).to(dtype)
    table = torch.randperm(blocks + 1, generator=gen, device=device)[:blocks].int()[None]
    q = torch.randn(q_len, num_heads, head_dim, generator=gen, device=device).to(dtype)
    lens = torch.tensor([ctx], dtype=torch.int32, device=device)
    qsl = torch.tensor([0, q_len], dtype=torch.int32, device=device)
    return q, k_cache, v_cache, table, lens, qsl


def matches_reference(fn: Callable, case: tuple, scale: float) -> bool:
    """fn's output against the fp32 reference, within twice the error of the reference run in the inputs' dtype
    (the kernel tests' criterion)."""
    q, k, v, table, lens, qsl = case
    out = torch.full_like(q, float("nan"))
    fn(out, q, k, v, table, lens, qsl, q.shape[0], scale)
    args = (table, lens, qsl, q.shape[0], int(lens[0]), scale)
    ref32 = reference.paged_attention(q.float(), k.float(), v.float(), *args)
    own = reference.paged_attention(q, k, v, *args).float()
    err, base = (out.float() - ref32).abs().max().item(), (own - ref32).abs().max().item()
    return bool(err == err and err <= 2 * base + 1e-3)  # err == err: no NaN


def tune(kernels: dict[str, Callable], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
         dtype: torch.dtype, device, time_us: Callable = cuda_time_us, shapes=SHAPES) -> list[dict]:
    """kernels: name -> prefill_attention-like callable ("mma" first: the fallback). Rows: q_len, prefix, us per
    kernel, choice."""
    scale = head_dim ** -0.5
    check = paged_case(300, 77, num_heads, num_kv_heads, head_dim, block_size, dtype, device)
    ok = {name: fn for name, fn in kernels.items() if name == "mma" or matches_reference(fn, check, scale)}
    for name in kernels.keys() - ok.keys():
        logger.warning("prefill attention kernel %s disagrees with the reference on this GPU: not used", name)
    rows, choice = [], []
    for q_len, prefix in shapes:
        q, k, v, table, lens, qsl = paged_case(q_len, prefix, num_heads, num_kv_heads, head_dim, block_size, dtype,
                                               device)
        out = torch.empty_like(q)
        us = {name: time_us(lambda fn=fn: fn(out, q, k, v, table, lens, qsl, q_len, scale)) for name, fn in ok.items()}
        best = min(us, key=us.get)
        choice.append(best)
        rows.append(dict(q_len=q_len, prefix=prefix, **{f"{name}_us": t for name, t in us.items()}, choice=best))
    _choice[:] = choice
    logger.info("prefill attention per chunk length: %s",
                ", ".join(f"<= {q}: {c}" for (q, _), c in zip(shapes, choice)))
    return rows


def tune_chunk_sdpa(paged: Callable, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                    dtype: torch.dtype, device, time_us: Callable = cuda_time_us) -> dict:
    """Whether an aligned later chunk goes through SDPA (chunk_sdpa) rather than `paged` (the paged kernel chosen
    for it): on if it matches the reference on a small case and is faster at CHUNK_SDPA_SHAPE. The row."""
    from pdcli.kernels import chunk_sdpa

    scale = head_dim ** -0.5

    def split(out, q, k, v, table, lens, qsl, max_q, s):
        out.copy_(chunk_sdpa.chunk_attention(q, k, v, table[0], int(lens[0]) - q.shape[0], s))

    check = paged_case(300, 512, num_heads, num_kv_heads, head_dim, block_size, dtype, device)

    def checked(grouped: bool) -> bool:
        chunk_sdpa.set_grouped(grouped)
        try:
            return matches_reference(split, check, scale)
        except Exception as err:  # e.g. a cuDNN that refuses fewer K/V heads than query heads: the other way
            logger.info("long-prompt chunks through SDPA, %s K/V heads: %s", "grouped" if grouped else "repeated", err)
            return False

    ok = (num_kv_heads != num_heads and checked(True)) or checked(False)
    q_len, prefix = CHUNK_SDPA_SHAPE
    q, k, v, table, lens, qsl = paged_case(q_len, prefix, num_heads, num_kv_heads, head_dim, block_size, dtype, device)
    out = torch.empty_like(q)
    row = dict(q_len=q_len, prefix=prefix, matches_reference=ok, grouped=chunk_sdpa.grouped(),
               paged_us=time_us(lambda: paged(out, q, k, v, table, lens, qsl, q_len, scale)))
    if ok:
        row["chunk_sdpa_us"] = time_us(lambda: split(out, q, k, v, table, lens, qsl, q_len, scale))
    _chunk_sdpa[0] = bool(ok and row["chunk_sdpa_us"] < row["paged_us"])
    logger.info("aligned long-prompt chunks through SDPA: %s (%s)", "on" if _chunk_sdpa[0] else "off", row)
    _chunk_sdpa_row[0] = dict(row, choice="chunk_sdpa" if _chunk_sdpa[0] else "paged")
    return dict(_chunk_sdpa_row[0])
