"""wgmma_tma with K and V on one barrier per stage (PDCLI_TMA_SPLIT=0, read once per process), on barriers of their
own (1: K released once both QK GEMMs are done; warpgroup 1 waits on none, FA3's order), or those and FA3's
intra-warpgroup overlap (2: tile n's QK and tile n - 1's PV GEMM issued in one turn, tile n's softmax under the
latter): 8k / 32k causal prefill at block sizes 16 / 64, beside SDPA; one JSON line per shape. From the repo root
with PYTHONPATH=$PWD:
    for s in 0 1 0 1; do PDCLI_TMA_SPLIT=$s python results/kernel_experiments/prefill_tma/split.py; done
PDCLI_TMA_VCP=1 with 2: V by cp.async from two loader warps where block_size < 64 (K stays TMA)."""
import json
import os

import torch

from pdcli.benchmarks.kernels import bench_prefill
from pdcli.kernels import build

mod = build.load()
for seq_len in (8192, 32768):
    for block_size in (16, 64):
        r = bench_prefill(mod, seq_len, block_size=block_size, kernel="wgmma_tma")
        print(json.dumps({"device": torch.cuda.get_device_name(), "split": os.environ.get("PDCLI_TMA_SPLIT", "0"),
                          "v_cp": os.environ.get("PDCLI_TMA_VCP", "0"),
                          "seq_len": seq_len, "block_size": block_size, "tflops": round(r["tflops"], 1),
                          "sdpa_tflops": round(r["sdpa_tflops"], 1), "correct": r["correct"]}), flush=True)
