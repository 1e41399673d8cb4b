"""Issue 25: where wgmma_ws spends its time against cuDNN's SDPA on the same 8k causal prefill (32 q / 8 kv heads,
D 128, bf16). Launches each once after a warm-up, between cudaProfilerStart / Stop, for Nsight Compute:

    ncu --clock-control none --profile-from-start off --set full -o $OUT/prefill8k \
        python results/kernel_experiments/ncu_prefill/run.py
    ncu --import $OUT/prefill8k.ncu-rep --page details --csv > $OUT/prefill8k_details.csv

(from the repo root; the kernels build as the engine's; PREFILL_KERNEL=wgmma_tma profiles that one instead of
wgmma_ws, with block_size BLOCK_SIZE, default 16). Without ncu it prints each one's time."""
import os

import torch
import torch.nn.functional as F

from pdcli.benchmarks.device import time_us
from pdcli.benchmarks.kernels import make_paged
from pdcli.kernels import build
from pdcli.kernels.ops import prefill_kernel_fn


def main(n: int = 8192, hq: int = 32, hk: int = 8, d: int = 128):
    mod = build.load()
    gen = torch.Generator(device="cuda").manual_seed(n)
    kc, vc, tables, k, v = make_paged(1, n, hk, d, int(os.environ.get("BLOCK_SIZE", "16")), torch.bfloat16, gen)
    q = torch.randn(n, hq, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor([n], dtype=torch.int32, device="cuda")
    qsl = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    out, scale = torch.empty_like(q), d ** -0.5
    name = os.environ.get("PREFILL_KERNEL", "wgmma_ws")
    fn = prefill_kernel_fn(mod, name)
    ours = lambda: fn(out, q, kc, vc, tables, lens, qsl, n, scale)  # noqa: E731
    sdpa = lambda: F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, is_causal=True, scale=scale,  # noqa: E731
                                                  enable_gqa=True)
    flops = 4 * hq * d * n * (n + 1) / 2
    for label, f in ((name, ours), ("sdpa", sdpa)):
        print(f"{label}: {flops / time_us(f, iters=10) / 1e6:.0f} TFLOP/s", flush=True)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    ours()
    sdpa()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
