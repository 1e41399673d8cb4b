"""Issue 26: does a bandwidth-bound decode attention overlap a compute-bound GEMM when the two run on two CUDA
streams of one GPU (no SM partitioning)? The offline target needs it (NanoFlow's point: the whole-run bound with
each op alone at its own floor is ~7.8k tok/s on an H100 against the 8.5k asked). Times pdcli's paged decode
attention (batch 256, 1,536-token contexts, llama3-8b heads: ~1.6 GB of K/V a call) and an [M, 4096] x [4096,
14336] bf16 GEMM (the MLP's up projection) alone, then together on two streams, pairwise (both joined after each
pair) and as two independent streams of `reps` calls each. One JSON line per M; run from the repo root:
    python results/kernel_experiments/overlap_probe/run.py"""
import json

import torch

from pdcli.benchmarks.kernels import make_paged
from pdcli.kernels import build


def ms_per_rep(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def decode_attention_call(batch: int, ctx: int):
    """pdcli's paged decode attention over batch random sequences of ctx tokens (llama3-8b heads), as a call;
    and the generator, for the GEMM's operands."""
    mod = build.load()
    gen = torch.Generator(device="cuda").manual_seed(0)
    kc, vc, tables, _, _ = make_paged(batch, ctx, 8, 128, 16, torch.bfloat16, gen)
    q = torch.randn(batch, 32, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    return (lambda: mod.decode_attention(out, q, kc, vc, tables, lens, 128 ** -0.5, 0, ctx)), gen


def main(batch: int = 256, ctx: int = 1536, reps: int = 20):
    attn, gen = decode_attention_call(batch, ctx)
    main_s, s1, s2 = torch.cuda.current_stream(), torch.cuda.Stream(), torch.cuda.Stream()
    print(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, batch=batch, ctx=ctx,
                          kv_bytes=2 * batch * ctx * 8 * 128 * 2)), flush=True)
    for m in (512, 1024, 2048, 4096, 8192):
        x = torch.randn(m, 4096, generator=gen, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(14336, 4096, generator=gen, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(m, 14336, device="cuda", dtype=torch.bfloat16)
        gemm = lambda: torch.mm(x, w.t(), out=y)  # noqa: E731

        def pair():
            s1.wait_stream(main_s)
            s2.wait_stream(main_s)
            with torch.cuda.stream(s1):
                attn()
            with torch.cuda.stream(s2):
                gemm()
            main_s.wait_stream(s1)
            main_s.wait_stream(s2)

        def streams():  # reps of each, the two streams joined once
            s1.wait_stream(main_s)
            s2.wait_stream(main_s)
            with torch.cuda.stream(s1):
                for _ in range(reps):
                    attn()
            with torch.cuda.stream(s2):
                for _ in range(reps):
                    gemm()
            main_s.wait_stream(s1)
            main_s.wait_stream(s2)

        a, g = ms_per_rep(attn, reps), ms_per_rep(gemm, reps)
        p, s = ms_per_rep(pair, reps), ms_per_rep(streams, 3) / reps
        print(json.dumps(dict(m=m, attn_ms=round(a, 4), gemm_ms=round(g, 4), gemm_tflops=round(2 * m * 4096 * 14336 / g / 1e9, 1),
                              sum_ms=round(a + g, 4), max_ms=round(max(a, g), 4), pair_ms=round(p, 4),
                              streams_ms=round(s, 4), hidden_of_shorter=round((a + g - min(p, s)) / min(a, g), 3))),
              flush=True)


if __name__ == "__main__":
    main()
