"""Issue 26's offline run in the regime where it spends its time: dummy:qwen3-8b decode steps at the batches the
run decodes (the KV pool holds 196 sequences of 2,048 tokens on an H100) and the contexts they pass through
(1,024-2,047), against each step's per-op roofline; and the run's serial bound (any schedule of kernels one at a
time, every kernel at its roofline) divided by those ratios: what a perfectly staggered schedule of these kernels
could reach. From the repo root with PYTHONPATH=$PWD; JSON lines."""
import json

import torch

from pdcli import LLM
from pdcli.benchmarks.device import copy_bandwidth, free_gpu, matmul_rate
from pdcli.benchmarks.engine import decode_steps
from pdcli.benchmarks.roofline import decode_step_ops, offline_serial_bound_tok_s, roofline_ms

bw, mm = copy_bandwidth(), matmul_rate()
llm = LLM("dummy:qwen3-8b", device="cuda", max_model_len=2048 + 16)
arch = llm.engine.arch
serial = offline_serial_bound_tok_s(arch, 512, 1024, 1024, bw, mm, 256)
print(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_bw_gb_s=round(bw / 1e9),
                      matmul_tflop_s=round(mm / 1e12), serial_bound_tok_s=round(serial))), flush=True)
for batch, context in ((196, 1024), (196, 1536), (196, 1792), (128, 1536)):
    ms = decode_steps(llm, batch, context, 24)
    roof = roofline_ms(decode_step_ops(arch, batch, context + 14), bw, mm)  # 2 warmup + 24 steps: mean context + 14
    print(json.dumps(dict(batch=batch, context=context, step_ms=round(ms, 3), op_roofline_ms=round(roof, 3),
                          ratio=round(ms / roof, 3), out_tok_s=round(batch / ms * 1e3),
                          serial_bound_at_this_ratio_tok_s=round(serial / (ms / roof)))), flush=True)
del llm
free_gpu()
