"""The engine benchmark's decode step (dummy:llama3-8b, batch 1-256, context 256) with each decoder weight's first
lines read into L2 ahead of its GEMM (PDCLI_L2_PREFETCH_MB, csrc/l2_prefetch.cu) at several sizes, one LLM at a
time in one process, the settings in turn and repeated. Needs commit daad9a8's code (reverted after this run).
From the repo root with PYTHONPATH=$PWD; JSON lines.
    python results/kernel_experiments/l2_prefetch/sweep.py [SPEC ...]"""
import json
import os
import sys

import torch

from pdcli import LLM
from pdcli.benchmarks.device import copy_bandwidth, free_gpu, matmul_rate
from pdcli.benchmarks.engine import decode_rows, weight_bytes
from pdcli.models.arch import ModelArch
from pdcli.models.presets import PRESETS

SPECS = sys.argv[1:] or ["0", "8", "16", "qkv=8,o=4,gate_up=16,down=8", "32", "0", "8", "16"]
bw, mm = copy_bandwidth(), matmul_rate()
arch = ModelArch.from_hf_config(PRESETS["llama3-8b"])
print(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_bw_gb_s=round(bw / 1e9),
                      matmul_tflop_s=round(mm / 1e12))), flush=True)
for spec in SPECS:
    os.environ["PDCLI_L2_PREFETCH_MB"] = spec
    llm = LLM("dummy:llama3-8b", device="cuda", max_model_len=2048)
    for r in decode_rows(llm, weight_bytes("llama3-8b"), arch, bw, mm, lambda *a: None):
        print(json.dumps(dict(prefetch_mb=spec, batch=r["batch"], step_ms=round(r["step_ms"], 3),
                              op_roofline_ms=round(r["op_roofline_ms"], 3),
                              ratio=round(r["step_ms"] / r["op_roofline_ms"], 3))), flush=True)
    del llm
    free_gpu()
