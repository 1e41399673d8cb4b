"""Kernel benchmark: check each kernel against the reference on fresh inputs, then time it with CUDA
events against PyTorch (SDPA on a contiguous cache). Writes results/kernels_<device>.json.

    python -m pdcli.benchmarks.kernels [--out results]
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from pdcli import envs
from pdcli.benchmarks.device import copy_bandwidth, device_slug, matmul_rate, time_us
from pdcli.benchmarks.results import provenance, write
from pdcli.config import CacheConfig
from pdcli.kernels import build, reference
from pdcli.kernels.ops import prefill_kernel_fn

BLOCK_SIZE = CacheConfig().block_size  # the engine's: every paged kernel is timed at it


def graph_us(fns, calls: int = 10) -> float:
    """Per-call time of `calls` back-to-back calls replayed from one CUDA graph (as decode runs in the engine),
    cycling through `fns` so that inputs larger than L2 together are not re-read from it."""
    for fn in fns:
        fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    return time_us(graph.replay) / calls


def copies_past_l2(nbytes: int) -> int:
    """How many copies of an input of `nbytes` make a cycle over 256 MB (H100/H200 L2 is 50-60 MB)."""
    return max(1, -(-256 * 2**20 // nbytes))


def rel_err(x, ref) -> float:
    return ((x.float() - ref).norm() / ref.norm()).item()


def make_paged(batch: int, ctx: int, hk: int, d: int, block_size: int, dtype, gen, shuffle: bool = True):
    """Random K/V of `batch` sequences of `ctx` tokens, in a paged cache (blocks shuffled: a fragmented pool;
    else each sequence's blocks in order), and contiguous."""
    nb = -(-ctx // block_size)
    k = torch.randn(batch, hk, nb * block_size, d, generator=gen, device="cuda", dtype=dtype)
    v = torch.randn(batch, hk, nb * block_size, d, generator=gen, device="cuda", dtype=dtype)
    perm = torch.randperm(batch * nb, generator=gen, device="cuda") if shuffle else torch.arange(batch * nb, device="cuda")
    kc = torch.empty(batch * nb, block_size, hk, d, device="cuda", dtype=dtype)
    vc = torch.empty_like(kc)
    kc[perm] = k.view(batch, hk, nb, block_size, d).permute(0, 2, 3, 1, 4).reshape(batch * nb, block_size, hk, d)
    vc[perm] = v.view(batch, hk, nb, block_size, d).permute(0, 2, 3, 1, 4).reshape(batch * nb, block_size, hk, d)
    tables = perm.view(batch, nb).int()
    return kc, vc, tables, k[:, :, :ctx], v[:, :, :ctx]


def bench_decode(mod, batch, ctx, hq=32, hk=8, d=128, block_size=BLOCK_SIZE, dtype=torch.bfloat16, copy_bw=None,
                 num_splits=0, shuffle=True):
    """Paged decode attention (num_splits 0: the kernel's own choice) against SDPA on a contiguous cache,
    both timed from CUDA graphs."""
    gen = torch.Generator(device="cuda").manual_seed(batch * 7919 + ctx)
    kc, vc, tables, k, v = make_paged(batch, ctx, hk, d, block_size, dtype, gen, shuffle)
    q = torch.randn(batch, hq, d, generator=gen, device="cuda", dtype=dtype)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    scale = d ** -0.5
    out = torch.full_like(q, float("nan"))
    mod.decode_attention(out, q, kc, vc, tables, lens, scale, num_splits, ctx)
    sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)  # noqa: E731
    ref32 = F.scaled_dot_product_attention(q[:, :, None].float(), k.float(), v.float(), scale=scale, enable_gqa=True)[:, :, 0]
    err, sdpa_err = rel_err(out, ref32), rel_err(sdpa()[:, :, 0], ref32)
    nbytes = 2 * batch * ctx * hk * d * dtype.itemsize + 2 * q.numel() * q.element_size()
    n = copies_past_l2(nbytes)
    caches = [(kc, vc)] + [(kc.clone(), vc.clone()) for _ in range(n - 1)]
    conts = [(k, v)] + [(k.clone(), v.clone()) for _ in range(n - 1)]
    us = graph_us([lambda c=c: mod.decode_attention(out, q, c[0], c[1], tables, lens, scale, num_splits, ctx)
                   for c in caches])
    sdpa_us = graph_us([lambda c=c: F.scaled_dot_product_attention(q[:, :, None], c[0], c[1], scale=scale,
                                                                   enable_gqa=True) for c in conts])
    del caches, conts
    row = dict(batch=batch, ctx=ctx, hq=hq, hk=hk, head_dim=d, block_size=block_size, dtype=str(dtype),
               blocks="shuffled" if shuffle else "in order", num_splits=mod.decode_attention_num_splits(
                   batch, hk, ctx, d) if num_splits == 0 else num_splits, us=us,
               gb_s=nbytes / us / 1e3, sdpa_contiguous_us=sdpa_us, rel_err=err, sdpa_rel_err=sdpa_err,
               correct=bool(err <= 2 * sdpa_err + 1e-3 and not out.isnan().any()))
    if copy_bw:
        row["frac_copy_bw"] = nbytes / (us * 1e-6) / copy_bw
    return row


def bench_store(mod, num_tokens, hk=8, d=128, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    k = torch.randn(num_tokens, hk, d, generator=gen, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    kc = torch.zeros(num_tokens // 16 + 64, 16, hk, d, device="cuda", dtype=dtype)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(kc.shape[0] * 16, generator=gen, device="cuda")[:num_tokens]
    mod.store_kvcache(k, v, kc, vc, slots)
    rk, rv = torch.zeros_like(kc), torch.zeros_like(vc)
    reference.store_kvcache(k, v, rk, rv, slots)
    correct = bool(torch.equal(kc, rk) and torch.equal(vc, rv))
    us = graph_us([lambda: mod.store_kvcache(k, v, kc, vc, slots)])
    nbytes = 4 * k.numel() * k.element_size()
    return dict(num_tokens=num_tokens, us=us, gb_s=nbytes / us / 1e3, correct=correct)


GEMV_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
               "lm_head": (128256, 4096)}  # llama3-8b: (n, k) of each linear


def bench_gemv(mod, m, name, dtype=torch.bfloat16, copy_bw=None):
    """Skinny matmul (m rows) against F.linear (cuBLAS), both replayed from CUDA graphs as in decode."""
    n, k = GEMV_SHAPES[name]
    gen = torch.Generator(device="cuda").manual_seed(n + k + m)
    x = torch.randn(m, k, generator=gen, device="cuda", dtype=dtype)
    w = (torch.randn(n, k, generator=gen, device="cuda") * k ** -0.5).to(dtype)
    y = torch.empty(m, n, device="cuda", dtype=dtype)
    mod.gemv(y, x, w, None)
    ref32 = x.float() @ w.float().T
    row = dict(m=m, linear=name, n=n, k=k, rel_err=rel_err(y, ref32), torch_rel_err=rel_err(F.linear(x, w), ref32))
    row["correct"] = bool(row["rel_err"] <= 2 * row["torch_rel_err"] + 1e-6)
    nbytes = w.numel() * w.element_size()
    ws = [w] + [w.clone() for _ in range(copies_past_l2(nbytes) - 1)]
    row["us"] = graph_us([lambda wi=wi: mod.gemv(y, x, wi, None) for wi in ws])
    row["cublas_us"] = graph_us([lambda wi=wi: F.linear(x, wi) for wi in ws])
    row["gb_s"], row["cublas_gb_s"] = nbytes / row["us"] / 1e3, nbytes / row["cublas_us"] / 1e3
    row["path"] = "gemv" if row["us"] < row["cublas_us"] else "cublas"  # what the engine's timing picks
    if copy_bw:
        row["frac_copy_bw"] = nbytes / (row["us"] * 1e-6) / copy_bw
    return row


PREFILL_LENS = (2048, 8192, 32768)


def prefill_kernels(mod, head_dim: int = 128) -> list[str]:
    """The prefill attention kernels this build has: "mma" (mma.sync), and on an sm_90a GPU "wgmma", its
    warp-specialised variant "wgmma_ws", and that with K/V loaded by TMA "wgmma_tma"."""
    return ["mma", *(["wgmma", "wgmma_ws", "wgmma_tma"] if mod.has_prefill_attention_wgmma(head_dim) else [])]


def bench_prefill(mod, seq_len, hq=32, hk=8, d=128, block_size=BLOCK_SIZE, dtype=torch.bfloat16, kernel="mma"):
    fn = prefill_kernel_fn(mod, kernel)
    gen = torch.Generator(device="cuda").manual_seed(seq_len)
    kc, vc, tables, k, v = make_paged(1, seq_len, hk, d, block_size, dtype, gen)
    q = torch.randn(seq_len, hq, d, generator=gen, device="cuda", dtype=dtype)
    lens = torch.tensor([seq_len], dtype=torch.int32, device="cuda")
    qsl = torch.tensor([0, seq_len], dtype=torch.int32, device="cuda")
    scale = d ** -0.5
    flops = 4 * hq * d * seq_len * (seq_len + 1) / 2  # causal: QK^T and PV over the lower triangle
    sdpa = lambda: F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, is_causal=True, scale=scale,  # noqa: E731
                                                  enable_gqa=True)
    row = dict(seq_len=seq_len, kernel=kernel, hq=hq, hk=hk, head_dim=d, block_size=block_size,
               sdpa_us=time_us(sdpa, iters=10))
    row["sdpa_tflops"] = flops / row["sdpa_us"] / 1e6
    out = torch.full_like(q, float("nan"))
    fn(out, q, kc, vc, tables, lens, qsl, seq_len, scale)
    ref = sdpa()[0].transpose(0, 1)
    # fp32 truth per chunk of queries (the math path's SDPA would ask for 128 GiB at 32k)
    ref32 = reference.paged_attention_fp32_chunked(q, kc, vc, tables, lens, qsl, scale)
    row.update(rel_err=rel_err(out, ref32), sdpa_rel_err=rel_err(ref, ref32))
    row["correct"] = bool(row["rel_err"] <= 2 * row["sdpa_rel_err"] + 1e-3 and not out.isnan().any())
    row["us"] = time_us(lambda: fn(out, q, kc, vc, tables, lens, qsl, seq_len, scale), iters=10)
    row["tflops"] = flops / row["us"] / 1e6
    return row


DECODE_SHAPES = [(64, 4096), (1, 32768), (1, 4096), (8, 4096), (32, 4096), (128, 2048), (256, 1024)]  # (batch, ctx)


def print_decode(r: dict) -> None:
    print(f"decode B={r['batch']:>3} ctx={r['ctx']:>5} {r['dtype']:>14} {r['blocks']:>8} blocks, "
          f"splits={r['num_splits']}: {r['us']:8.1f} us  {r['gb_s']:7.0f} GB/s ({r.get('frac_copy_bw', 0):.1%} of copy)  "
          f"sdpa {r['sdpa_contiguous_us']:8.1f} us  correct={r['correct']}")


def print_prefill(r: dict) -> None:
    print(f"prefill {r['seq_len']:>5} {r['kernel']:>8}: ours {r['tflops']:6.1f} TFLOP/s  "
          f"sdpa {r['sdpa_tflops']:6.1f} "
          f"TFLOP/s correct={r['correct']}")


def print_gemv(r: dict) -> None:
    print(f"gemv m={r['m']} {r['linear']:>8}: ours {r['us']:7.1f} us {r['gb_s']:6.0f} GB/s  cublas "
          f"{r['cublas_us']:7.1f} us {r['cublas_gb_s']:6.0f} GB/s correct={r['correct']}")


def parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results")
    ap.add_argument("--prefill-only", action="store_true", help="time the prefill kernel alone (no JSON)")
    ap.add_argument("--gemv-only", action="store_true", help="time the skinny matmul alone (no JSON)")
    ap.add_argument("--decode-only", action="store_true", help="time decode attention alone (no JSON)")
    ap.add_argument("--splits", default="0", help="with --decode-only: comma list of split-KV counts to time "
                                                  "(0: the kernel's own choice)")
    return ap.parse_args(argv)


def bench_all(mod, copy_bw: float) -> dict[str, list[dict]]:
    """Every kernel on its shapes, printed: decode, store, prefill and gemv rows."""
    decode = [bench_decode(mod, b, c, copy_bw=copy_bw) for b, c in DECODE_SHAPES]
    decode.append(bench_decode(mod, 64, 4096, dtype=torch.float16, copy_bw=copy_bw))
    decode.append(bench_decode(mod, 64, 4096, copy_bw=copy_bw, shuffle=False))
    store = [bench_store(mod, n) for n in (64, 512, 4096, 16384)]
    prefill = [bench_prefill(mod, n, kernel=k) for k in prefill_kernels(mod) for n in PREFILL_LENS]
    gemv = [bench_gemv(mod, m, name, copy_bw=copy_bw) for m in (1, 4) for name in GEMV_SHAPES]
    for r in decode:
        print_decode(r)
    for r in store:
        print(f"store {r['num_tokens']:>6} tokens: {r['us']:7.1f} us {r['gb_s']:7.0f} GB/s correct={r['correct']}")
    for r in prefill:
        print_prefill(r)
    for r in gemv:
        print_gemv(r)
    return dict(decode=decode, store=store, prefill=prefill, gemv=gemv)


def engine_prefill_row(prefill: list[dict], seq_len: int) -> dict:
    """The row of the kernel the engine runs at seq_len: the one PDCLI_PREFILL_KERNEL names (mma where the
    build has no other), or with "auto" the fastest of those that matched the reference, as the engine's own
    timing at start picks."""
    rows = [r for r in prefill if r["seq_len"] == seq_len]
    kernel = envs.prefill_kernel()
    if kernel == "auto":
        return max((r for r in rows if r["correct"] or r["kernel"] == "mma"), key=lambda r: r["tflops"])
    return next((r for r in rows if r["kernel"] == kernel), next(r for r in rows if r["kernel"] == "mma"))


def summary(decode: list[dict], prefill: list[dict]) -> dict:
    """The headline figures: B64 ctx4k decode attention (shuffled and in-order blocks, each beside SDPA), B1
    ctx32k decode's share of copy bandwidth, 8k and 32k prefill TFLOP/s of the kernel the engine runs
    (engine_prefill_row) and, where the build has it, of the wgmma kernel."""
    d64 = decode[0]  # bf16, shuffled blocks
    d64_in_order = next(r for r in decode if r["batch"] == 64 and r["blocks"] == "in order")
    d1 = next(r for r in decode if r["batch"] == 1 and r["ctx"] == 32768)
    p8, p32 = (engine_prefill_row(prefill, n) for n in (8192, 32768))
    engine = p8["kernel"] if p8["kernel"] == p32["kernel"] else f"{p8['kernel']} (8k), {p32['kernel']} (32k)"
    wgmma = {f"prefill_attn_{n // 1024}k_{r['kernel']}_tflops": r["tflops"] for r in prefill for n in (8192, 32768)
             if r["kernel"] != "mma" and r["seq_len"] == n}
    return dict(device=torch.cuda.get_device_name(), kernel_path="cuda", block_size=BLOCK_SIZE,
                decode_attn_b64_ctx4k_us=d64["us"], decode_attn_b64_ctx4k_sdpa_us=d64["sdpa_contiguous_us"],
                decode_attn_b64_ctx4k_in_order_us=d64_in_order["us"],
                decode_attn_b64_ctx4k_in_order_sdpa_us=d64_in_order["sdpa_contiguous_us"],
                decode_attn_b1_ctx32k_bw_frac=d1["frac_copy_bw"], prefill_attn_8k_tflops=p8["tflops"],
                prefill_attn_8k_sdpa_tflops=p8["sdpa_tflops"], prefill_attn_32k_tflops=p32["tflops"],
                prefill_attn_32k_sdpa_tflops=p32["sdpa_tflops"], prefill_attn_kernel=engine, **wgmma)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("error: the kernel benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    mod = build.load()
    if args.prefill_only:
        for r in [bench_prefill(mod, n, kernel=k) for k in prefill_kernels(mod) for n in PREFILL_LENS]:
            print_prefill(r)
        return 0
    if args.gemv_only:
        for r in [bench_gemv(mod, m, name) for m in (1, 4) for name in GEMV_SHAPES]:
            print_gemv(r)
        return 0
    copy_bw, mm = copy_bandwidth(), matmul_rate()
    if args.decode_only:
        for b, c in DECODE_SHAPES:
            for splits in (int(x) for x in args.splits.split(",")):
                print_decode(bench_decode(mod, b, c, copy_bw=copy_bw, num_splits=splits))
        return 0
    print(f"{torch.cuda.get_device_name()}: copy {copy_bw / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s")
    rows = bench_all(mod, copy_bw)
    result = dict(summary=summary(rows["decode"], rows["prefill"]), copy_bw_bytes_s=copy_bw, matmul_bf16_flop_s=mm,
                  **rows, provenance=provenance("pdcli.benchmarks.kernels", argv,
                                                source_hash=build.source_hash()[:16]))
    path = write(args.out, f"kernels_{device_slug()}", result)
    print(f"wrote {path}")
    return 0 if all(r["correct"] for rs in rows.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
