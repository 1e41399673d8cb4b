"""The engine benchmark's decode step (dummy:llama3-8b, batch 1-256, context 256) with the tensor-core skinny matmul
on the linears of at least PDCLI_SKINNY_MIN_N output features (unset: cuBLAS everywhere), settings in turn and
repeated, one LLM at a time. Needs commit 9d0441d's code. From the repo root with PYTHONPATH=$PWD; JSON lines.
    python results/kernel_experiments/skinny_wgmma/engine_sweep.py [MIN_N|off ...]"""
import json
import os
import sys

import torch

from pdcli import LLM
from pdcli.benchmarks.device import copy_bandwidth, free_gpu, matmul_rate
from pdcli.benchmarks.engine import decode_rows, weight_bytes
from pdcli.models.arch import ModelArch
from pdcli.models.presets import PRESETS

SETTINGS = sys.argv[1:] or ["off", "100000", "20000", "0", "off", "100000", "20000"]
bw, mm = copy_bandwidth(), matmul_rate()
arch = ModelArch.from_hf_config(PRESETS["llama3-8b"])
print(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_bw_gb_s=round(bw / 1e9))),
      flush=True)
for setting in SETTINGS:
    os.environ.pop("PDCLI_SKINNY_MIN_N", None)
    if setting != "off":
        os.environ["PDCLI_SKINNY_MIN_N"] = setting
    llm = LLM("dummy:llama3-8b", device="cuda", max_model_len=2048)
    for r in decode_rows(llm, weight_bytes("llama3-8b"), arch, bw, mm, lambda *a: None):
        print(json.dumps(dict(skinny_min_n=setting, batch=r["batch"], step_ms=round(r["step_ms"], 3),
                              op_roofline_ms=round(r["op_roofline_ms"], 3),
                              ratio=round(r["step_ms"] / r["op_roofline_ms"], 3))), flush=True)
    del llm
    free_gpu()
