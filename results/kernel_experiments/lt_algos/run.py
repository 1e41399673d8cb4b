"""cuBLASLt's heuristic candidates against torch's default matmul at llama3-8b's / qwen3-8b's decode shapes
(kernels/blas_choice.tune: each checked against the default, timed over 8 layers' weights in turn). One JSON line
per (rows, n, k); run from the repo root: python results/kernel_experiments/lt_algos/run.py"""
import json
import sys
import time

import torch

sys.path.insert(0, ".")
from pdcli.kernels import blas_choice, build  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096), "q3_gate_up": (24576, 4096), "q3_down": (4096, 12288)}
ROWS = [int(r) for r in (sys.argv[1] if len(sys.argv) > 1 else "16,32,64,128,192,256").split(",")]
if len(sys.argv) > 2:  # more of the heuristic's candidates than the engine asks for
    blas_choice.MAX_ALGOS = int(sys.argv[2])

start = time.perf_counter()
mod = build.load_lt()
print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "build_s": round(time.perf_counter() - start, 1)}), flush=True)
for name, (n, k) in SHAPES.items():
    copies = 1 if name == "lm_head" else blas_choice.STREAM_WEIGHTS
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5 for _ in range(copies)]
    for r in blas_choice.tune(ws, ROWS, mod):
        r["name"] = name
        r["default_us"] = round(r["default_us"], 1)
        r["algos_us"] = [None if u is None else round(u, 1) for u in r["algos_us"]]
        best = min([u for u in r["algos_us"] if u is not None], default=None)
        r["best_lt_vs_default"] = None if best is None else round(best / r["default_us"], 3)
        print(json.dumps(r), flush=True)
    del ws
    torch.cuda.empty_cache()
