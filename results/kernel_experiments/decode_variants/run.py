"""Issue 26 experiment: pdcli's paged decode attention built with other CTA shapes (warps per CTA, ring stages,
CTAs per SM) at the engine's decode shapes (llama3-8b heads, block 16, blocks shuffled, one split per sequence),
against the engine's build and SDPA on a contiguous cache; each checked against fp32 SDPA. The engine's step at
batch 64 and context 256 spends ~0.96 ms in decode attention where its bytes take ~0.71 at the copy rate: 512
CTAs of 256 keys in two waves of 2 per SM. Builds each variant (~1 min), then prints JSON lines; from the repo
root:  python results/kernel_experiments/decode_variants/run.py"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load

sys.path.insert(0, os.getcwd())
from pdcli.benchmarks.device import copy_bandwidth  # noqa: E402
from pdcli.benchmarks.kernels import graph_us, make_paged, rel_err  # noqa: E402
from pdcli.kernels import build  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.getcwd(), "pdcli", "csrc")
VARIANTS = ((4, 3, 2), (2, 3, 4), (4, 2, 3), (2, 4, 3), (2, 2, 6))  # (warps, stages, min CTAs per SM)
SHAPES = ((64, 256), (64, 1024), (64, 4096), (256, 256), (256, 1024))  # (batch, context)


def build_variant(w: int, s: int, c: int):
    name = f"dec_w{w}_s{s}_c{c}"
    d = os.path.join(os.getcwd(), ".kernel_build", "experiments", name)  # git-ignored, kept between calls
    os.makedirs(d, exist_ok=True)
    return load(name=name, sources=[os.path.join(HERE, "bind.cpp"), os.path.join(CSRC, "decode_attention.cu"),
                                        os.path.join(CSRC, "decode_attention_persistent.cu")],
                build_directory=d, extra_include_paths=[CSRC], verbose=False,
                extra_cuda_cflags=["-O3", "-std=c++17", "--use_fast_math", "-U__CUDA_NO_HALF_OPERATORS__",
                                   "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                                   "-gencode=arch=compute_90,code=sm_90", f"-DPDCLI_DECODE_WARPS={w}",
                                   f"-DPDCLI_DECODE_STAGES={s}", f"-DPDCLI_DECODE_MIN_CTAS={c}"])


def main():
    t0 = time.time()
    mod = build.load()
    exps = {v: build_variant(*v) for v in VARIANTS}
    bw = copy_bandwidth()
    print(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, build_s=round(time.time() - t0),
                          copy_bw_gb_s=round(bw / 1e9))), flush=True)
    hq, hk, d, bs = 32, 8, 128, 16
    for batch, ctx in SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(batch * 7919 + ctx)
        kc, vc, tables, k, v = make_paged(batch, ctx, hk, d, bs, torch.bfloat16, gen)
        q = torch.randn(batch, hq, d, generator=gen, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        scale = d ** -0.5
        ref32 = F.scaled_dot_product_attention(q[:, :, None].float(), k.float(), v.float(), scale=scale,
                                               enable_gqa=True)[:, :, 0]
        sdpa_err = rel_err(F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)[:, :, 0],
                           ref32)
        nbytes = 2 * batch * ctx * hk * d * 2
        copies = max(1, int(200e6 // nbytes) + 1)  # > 200 MB of K/V in turn: each call reads from HBM
        caches = [(kc, vc)] + [(kc.clone(), vc.clone()) for _ in range(copies - 1)]
        out = torch.empty_like(q)
        part_o = torch.empty(1, device="cuda")
        part_lse = torch.empty(1, device="cuda")
        row = dict(batch=batch, ctx=ctx, floor_us=round(nbytes / bw * 1e6, 2))
        fns = {"engine": lambda c: mod.decode_attention(out, q, c[0], c[1], tables, lens, scale, 1, ctx)}
        for (w, s, c), m in exps.items():
            fns[f"w{w}s{s}c{c}"] = lambda cc, m=m: m.decode(out, part_o, part_lse, q, cc[0], cc[1], tables, lens,
                                                            scale, 1)
        for name, fn in fns.items():
            out.fill_(float("nan"))
            fn(caches[0])
            torch.cuda.synchronize()
            e = rel_err(out, ref32)
            row[name + "_ok"] = bool(e <= 2 * sdpa_err + 1e-3 and not out.isnan().any())
            row[name + "_us"] = round(graph_us([lambda c=c, fn=fn: fn(c) for c in caches]), 2)
        print(json.dumps(row), flush=True)
        del caches, kc, vc, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
