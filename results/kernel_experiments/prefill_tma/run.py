"""wgmma_tma (K/V by TMA, boxes of min(block_size, 128) rows) against wgmma_ws (cp.async) on one 8k and one 32k
causal prefill over paged K/V at block sizes 16, 64 and 128: does the TMA loader lose on its many small boxes (32
a tile at block_size 16)? One JSON line per (seq_len, block_size); from the repo root with PYTHONPATH=$PWD."""
import json
import sys

import torch

from pdcli.benchmarks.kernels import bench_prefill
from pdcli.kernels import build

mod = build.load()
print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)
for seq_len in (8192, 32768):
    for block_size in (16, 64, 128):
        row = {"seq_len": seq_len, "block_size": block_size}
        for kernel in ("wgmma_ws", "wgmma_tma"):
            r = bench_prefill(mod, seq_len, block_size=block_size, kernel=kernel)
            row[f"{kernel}_tflops"] = round(r["tflops"], 1)
            row[f"{kernel}_correct"] = r.get("correct")
            row["sdpa_tflops"] = round(r["sdpa_tflops"], 1)
        print(json.dumps(row), flush=True)
sys.exit(0)
