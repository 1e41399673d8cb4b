"""The engine benchmark's decode step (dummy:llama3-8b, batch 1-256, context 256) under settings of one environment
variable, one LLM at a time in one process: the shared loop of l2_prefetch/sweep.py and skinny_wgmma/engine_sweep.py.
A setting "off" leaves the variable unset. JSON lines, tagged `key`."""
import json
import os

import torch

from pdcli import LLM
from pdcli.benchmarks.device import copy_bandwidth, free_gpu, matmul_rate
from pdcli.benchmarks.engine import decode_rows, weight_bytes
from pdcli.models.arch import ModelArch
from pdcli.models.presets import PRESETS


def sweep(var: str, settings: list[str], key: str) -> None:
    bw, mm = copy_bandwidth(), matmul_rate()
    arch = ModelArch.from_hf_config(PRESETS["llama3-8b"])
    print(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_bw_gb_s=round(bw / 1e9),
                          matmul_tflop_s=round(mm / 1e12))), flush=True)
    for setting in settings:
        os.environ.pop(var, None)
        if setting != "off":
            os.environ[var] = setting
        llm = LLM("dummy:llama3-8b", device="cuda", max_model_len=2048)
        for r in decode_rows(llm, weight_bytes("llama3-8b"), arch, bw, mm, lambda *a: None):
            print(json.dumps({key: setting, "batch": r["batch"], "step_ms": round(r["step_ms"], 3),
                              "op_roofline_ms": round(r["op_roofline_ms"], 3),
                              "ratio": round(r["step_ms"] / r["op_roofline_ms"], 3)}), flush=True)
        del llm
        free_gpu()
