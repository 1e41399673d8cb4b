"""Issue 25 experiment: wgmma_ws variants (stages, non-blocking loader arrivals, grid order) against main's
kernel and SDPA, 8k / 32k causal, bf16; each checked against the chunked fp32 reference. Prints JSON lines."""
import json, os, sys, time
import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pdcli.kernels import build, reference  # noqa: E402
from pdcli.benchmarks.kernels import make_paged, rel_err  # noqa: E402
from pdcli.benchmarks.device import time_us  # noqa: E402

here = os.path.dirname(os.path.abspath(__file__))
os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
t0 = time.time()
exp = load(name="ws_exp", sources=[f"{here}/bind.cpp", f"{here}/ws3.cu"], build_directory=os.makedirs(f"{here}/build", exist_ok=True) or f"{here}/build",
           extra_cuda_cflags=["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                              "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                              "-U__CUDA_NO_HALF_CONVERSIONS__", "-gencode=arch=compute_90a,code=sm_90a", "-DPDCLI_SM90A"],
           verbose=False)
mod = build.load()
print(json.dumps(dict(build_s=round(time.time() - t0, 1), device=torch.cuda.get_device_name())), flush=True)
hq, hk, d, bs = 32, 8, 128, 16
variants = [("main", None, None), ("s2blk", 20, 1), ("s2noinc", 21, 1), ("s3blk", 30, 1), ("s3noinc", 31, 1),
            ("s3noinc_mfirst", 31, 0), ("s2blk_mfirst", 20, 0)]
for rep in range(2):
    for seq_len in (8192, 32768):
        gen = torch.Generator(device="cuda").manual_seed(seq_len)
        kc, vc, tables, k, v = make_paged(1, seq_len, hk, d, bs, torch.bfloat16, gen)
        q = torch.randn(seq_len, hq, d, generator=gen, device="cuda", dtype=torch.bfloat16)
        lens = torch.tensor([seq_len], dtype=torch.int32, device="cuda")
        qsl = torch.tensor([0, seq_len], dtype=torch.int32, device="cuda")
        scale = d ** -0.5
        flops = 4 * hq * d * seq_len * (seq_len + 1) / 2
        sdpa = lambda: F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, is_causal=True, scale=scale,
                                                      enable_gqa=True)
        ref32 = reference.paged_attention_fp32_chunked(q, kc, vc, tables, lens, qsl, scale) if rep == 0 else None
        sdpa_err = rel_err(sdpa()[0].transpose(0, 1), ref32) if rep == 0 else None
        row = dict(rep=rep, seq_len=seq_len, sdpa_tflops=round(flops / time_us(sdpa, iters=10) / 1e6, 1))
        for name, var, hi in variants:
            fn = (lambda o: mod.prefill_attention_wgmma_ws(o, q, kc, vc, tables, lens, qsl, seq_len, scale)) if var is None \
                else (lambda o, var=var, hi=hi: exp.ws_exp(o, q, kc, vc, tables, lens, qsl, seq_len, scale, var, hi))
            out = torch.full_like(q, float("nan"))
            fn(out)
            torch.cuda.synchronize()
            if rep == 0:
                e = rel_err(out, ref32)
                row[name + "_ok"] = bool(e <= 2 * sdpa_err + 1e-3 and not out.isnan().any())
            row[name] = round(flops / time_us(lambda: fn(out), iters=10) / 1e6, 1)
        row["sdpa_tflops_after"] = round(flops / time_us(sdpa, iters=10) / 1e6, 1)
        print(json.dumps(row), flush=True)
        del kc, vc, k, v, q, ref32
        torch.cuda.empty_cache()
