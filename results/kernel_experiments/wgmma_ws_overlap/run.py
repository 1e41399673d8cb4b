"""Issue 25 experiment: variants of pdcli's wgmma_ws kernel (pdcli/csrc/prefill_attention_sm90_ws.cu as of commit
ee315e8, unchanged since) beside the engine's build and cuDNN's SDPA, causal 8k / 16k / 32k, bf16, 32 q / 8 kv heads;
each checked against the chunked fp32 reference and, on a three-sequence chunked-prefill case, against the
engine's kernel. Each variant is that file with its launch function renamed (ws_old: nothing else) and
`<variant>.patch` applied (`patch`); ws_b / ws_db also take the softmax helpers of `wgmma_softmax_overlap.patch`
(applied to pdcli/csrc/wgmma_softmax.cuh). The sources are written to .kernel_build/experiments/src (git-ignored):
- ws_b: FA3's intra-warpgroup overlap (tile n's softmax under tile n - 1's PV GEMM, both GEMMs issued in one turn,
  the PV wait at the top of the next step), a 3-stage ring; ws_db: the same with two P buffers, loop unrolled twice
- ws_s3: main's loader with a 3-stage ring; ws_s3a: 3 stages, the next tile issued before the current is signalled
- ws_p: a persistent grid (a CTA per SM walking the work items, two Q buffers, loads run ahead across items);
  ws_p2: the same with the loader reading an item's tile parameters from global memory once per item, not once
  per tile (three dependent loads ahead of every tile's copies: ws_p's suspected flaw)
- ws_sleep: main's kernel with its mbarrier waits given a suspend-time hint (a waiting warp sleeps, not polls:
  main's compute warps poll the K/V tile's barrier ~47 times a tile, ~330 instructions a warp and tile against
  ~550 of work, `../ncu_prefill/source_stalls_h200.json`)
Prints JSON lines; from the repo root (WS_VARIANTS="ws_old,ws_p" picks some):
    python results/kernel_experiments/wgmma_ws_overlap/run.py"""
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load

sys.path.insert(0, os.getcwd())
from pdcli.benchmarks.device import time_us  # noqa: E402
from pdcli.benchmarks.kernels import make_paged, rel_err  # noqa: E402
from pdcli.kernels import build, reference  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.getcwd(), "pdcli", "csrc")


VARIANTS = tuple(os.environ.get("WS_VARIANTS", "ws_old,ws_b,ws_db,ws_s3,ws_s3a,ws_p,ws_p2,ws_sleep").split(","))
SRC = os.path.join(os.getcwd(), ".kernel_build", "experiments", "src")  # git-ignored


def materialise(name: str) -> str:
    """Writes the variant's source (and the overlap softmax header) under SRC; returns the .cu path."""
    os.makedirs(SRC, exist_ok=True)
    with open(os.path.join(CSRC, "prefill_attention_sm90_ws.cu")) as f:
        base = f.read().replace("launch_prefill_attention_sm90_ws(", "launch_ws_old(")
    old = os.path.join(SRC, "ws_old.cu")
    with open(old, "w") as f:
        f.write(base)
    header = os.path.join(SRC, "wgmma_softmax_overlap.cuh")
    subprocess.run(["patch", "-s", "-o", header, os.path.join(CSRC, "wgmma_softmax.cuh"),
                    os.path.join(HERE, "wgmma_softmax_overlap.patch")], check=True)
    if name == "ws_old":
        return old
    out = os.path.join(SRC, name + ".cu")
    subprocess.run(["patch", "-s", "-o", out, old, os.path.join(HERE, name + ".patch")], check=True)
    return out


def build_variant(name: str):
    d = os.path.join(os.getcwd(), ".kernel_build", "experiments", name)  # git-ignored
    os.makedirs(d, exist_ok=True)
    return load(name=name, sources=[os.path.join(HERE, "bind.cpp"), materialise(name)],
                build_directory=d, extra_include_paths=[CSRC], verbose=False,
                extra_cflags=["-O3", "-std=c++17", f"-DLAUNCH=launch_{name}"],
                extra_cuda_cflags=["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                                   "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                                   "-U__CUDA_NO_HALF_CONVERSIONS__", "-gencode=arch=compute_90a,code=sm_90a",
                                   "-DPDCLI_SM90A"])


def varlen_check(mod, exps, hq, hk, d, bs):
    """Three sequences of chunked prefill (new tokens 300 / 1,000 / 17 after 500 / 0 / 2,000 cached): each variant
    against the engine's kernel, itself tested against the reference (tests/test_kernel_prefill.py)."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    kc, vc, tables, _, _ = make_paged(3, 2048, hk, d, bs, torch.bfloat16, gen)
    lens = torch.tensor([800, 1000, 2017], dtype=torch.int32, device="cuda")
    qsl = torch.tensor([0, 300, 1300, 1317], dtype=torch.int32, device="cuda")
    q = torch.randn(1317, hq, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    ref = torch.empty_like(q)
    mod.prefill_attention_wgmma_ws(ref, q, kc, vc, tables, lens, qsl, 1000, d ** -0.5)
    row = {}
    for name, m in exps.items():
        out = torch.full_like(q, float("nan"))
        m.run(out, q, kc, vc, tables, lens, qsl, 1000, d ** -0.5)
        row[name] = rel_err(out, ref.float())
    print(json.dumps(dict(varlen_rel_err_vs_engine=row)), flush=True)


def main():
    t0 = time.time()
    mod = build.load()
    exps = {name: build_variant(name) for name in VARIANTS}
    print(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                          build_s=round(time.time() - t0))), flush=True)
    hq, hk, d, bs = 32, 8, 128, 16
    varlen_check(mod, exps, hq, hk, d, bs)
    for rep in range(2):
        for n in (8192, 16384, 32768):
            gen = torch.Generator(device="cuda").manual_seed(n)
            kc, vc, tables, k, v = make_paged(1, n, hk, d, bs, torch.bfloat16, gen)
            q = torch.randn(n, hq, d, generator=gen, device="cuda", dtype=torch.bfloat16)
            lens = torch.tensor([n], dtype=torch.int32, device="cuda")
            qsl = torch.tensor([0, n], dtype=torch.int32, device="cuda")
            scale = d ** -0.5
            flops = 4 * hq * d * n * (n + 1) / 2
            sdpa = lambda: F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, is_causal=True,  # noqa: E731
                                                          scale=scale, enable_gqa=True)
            row = dict(rep=rep, seq_len=n, sdpa_tflops=round(flops / time_us(sdpa, iters=10) / 1e6, 1))
            fns = dict(new=lambda o: mod.prefill_attention_wgmma_ws(o, q, kc, vc, tables, lens, qsl, n, scale))
            for name, m in exps.items():
                fns[name[3:]] = lambda o, m=m: m.run(o, q, kc, vc, tables, lens, qsl, n, scale)
            if rep == 0:
                ref32 = reference.paged_attention_fp32_chunked(q, kc, vc, tables, lens, qsl, scale)
                row["sdpa_err"] = rel_err(sdpa()[0].transpose(0, 1), ref32)
            for name, fn in fns.items():
                out = torch.full_like(q, float("nan"))
                fn(out)
                torch.cuda.synchronize()
                if rep == 0:
                    row[name + "_err"] = rel_err(out, ref32)
                    row[name + "_ok"] = bool(row[name + "_err"] <= 2 * row["sdpa_err"] + 1e-3
                                             and not out.isnan().any())
                row[name + "_tflops"] = round(flops / time_us(lambda: fn(out), iters=10) / 1e6, 1)
            row["sdpa_tflops_after"] = round(flops / time_us(sdpa, iters=10) / 1e6, 1)
            print(json.dumps(row), flush=True)
            del kc, vc, k, v, q
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
