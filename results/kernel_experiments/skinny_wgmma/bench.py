"""The tensor-core skinny matmul (csrc/skinny_wgmma.cu) against torch's linear (cuBLAS) on dummy:llama3-8b's decode
linears at 8-64 rows: CUDA-graph replays over weight copies cycled past L2, each K split the kernel allows beside
its own choice; GB/s of the weight read. Needs commit 9d0441d's code (reverted after this run). From the repo
root with PYTHONPATH=$PWD; JSON lines."""
import json

import torch
import torch.nn.functional as F

from pdcli.benchmarks.kernels import copies_past_l2, graph_us
from pdcli.kernels import build

mod = build.load()
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
gen = torch.Generator(device="cuda").manual_seed(0)
print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)
for name, (n, k) in SHAPES.items():
    ws = [(torch.randn(n, k, generator=gen, device="cuda") * k ** -0.5).to(torch.bfloat16)
          for _ in range(copies_past_l2(n * k * 2))]
    for m in (8, 16, 32, 64):
        x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
        y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x.float(), ws[0].float())
        row = dict(shape=name, n=n, k=k, rows=m, cublas_us=round(graph_us([lambda w=w: F.linear(x, w) for w in ws]), 2))
        auto = mod.skinny_wgmma(y, x, ws[0], None, 0)
        row["auto_splits"] = auto
        row["rel_err"] = round(((y.float() - ref).norm() / ref.norm()).item(), 5)
        for s in sorted({1, 2, 4, 8, auto}):
            if s <= -(-k // 64):
                row[f"split{s}_us"] = round(graph_us([lambda w=w, s=s: mod.skinny_wgmma(y, x, w, None, s) for w in ws]), 2)
        best = min(v for key, v in row.items() if key.startswith("split"))
        row["best_gb_s"], row["cublas_gb_s"] = round(n * k * 2 / best / 1e3), round(n * k * 2 / row["cublas_us"] / 1e3)
        print(json.dumps(row), flush=True)
    del ws
