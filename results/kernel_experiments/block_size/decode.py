"""The engine benchmark's decode step (dummy:llama3-8b, batch 1-256, context 256) with KV blocks of 16 and of 64
tokens, in one process (one LLM at a time): what the engine's block size does to decode. From the repo root with
PYTHONPATH=$PWD; JSON lines."""
import json

import torch

from pdcli import LLM
from pdcli.benchmarks.device import copy_bandwidth, free_gpu, matmul_rate
from pdcli.benchmarks.engine import decode_rows, weight_bytes
from pdcli.models.arch import ModelArch
from pdcli.models.presets import PRESETS

bw, mm = copy_bandwidth(), matmul_rate()
arch = ModelArch.from_hf_config(PRESETS["llama3-8b"])
for block_size in (16, 64):
    llm = LLM("dummy:llama3-8b", device="cuda", max_model_len=8192 + 64, block_size=block_size)
    for r in decode_rows(llm, weight_bytes("llama3-8b"), arch, bw, mm, lambda *a: None):
        print(json.dumps(dict(device=torch.cuda.get_device_name(), block_size=block_size, batch=r["batch"],
                              step_ms=round(r["step_ms"], 3), op_roofline_ms=round(r["op_roofline_ms"], 3))), flush=True)
    del llm
    free_gpu()
