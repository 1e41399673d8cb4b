"""Why the offline regime's decode steps (offline_regime/decode.py, 2026-12-06 call 4) measured below their per-op
roofline: dummy:qwen3-8b at batch 196, context 1,536 -- the step's kernels by GPU time (torch profiler), and the decode
attention alone at that shape (planned, one wave) against the fp32 reference and its bytes at the copy rate. From the
repo root with PYTHONPATH=$PWD; JSON lines."""
import json

import torch

from pdcli import LLM
from pdcli.benchmarks.device import copy_bandwidth
from pdcli.benchmarks.engine import kernel_breakdown
from pdcli.benchmarks.kernels import copies_past_l2, graph_us, make_paged, rel_err
from pdcli.config import CacheConfig
from pdcli.kernels import build, ops

bw = copy_bandwidth()
mod = build.load()
gen = torch.Generator(device="cuda").manual_seed(0)
B, CTX, HQ, HK, D = 196, 1550, 32, 8, 128
kc, vc, tables, _, _ = make_paged(B, CTX, HK, D, CacheConfig().block_size, torch.bfloat16, gen)
q = torch.randn(B, HQ, D, generator=gen, device="cuda", dtype=torch.bfloat16)
lens = torch.full((B,), CTX, dtype=torch.int32, device="cuda")
out = torch.empty_like(q)
plan = mod.decode_plan(lens, *ops.decode_plan_target(mod, HK, D))
counters = torch.zeros(B * HK, dtype=torch.int32, device="cuda")
mod.decode_attention_planned(out, q, kc, vc, tables, lens, D ** -0.5, plan, counters, True, True)
ref = torch.empty(B, HQ, D, device="cuda", dtype=torch.float32)
ops.reference_decode(ref, q.float(), kc.float(), vc.float(), tables, lens, D ** -0.5, 0, CTX)
nbytes = 2 * B * CTX * HK * D * 2
caches = [(kc, vc)] + [(kc.clone(), vc.clone()) for _ in range(copies_past_l2(nbytes) - 1)]
us = graph_us([lambda c=c: mod.decode_attention_planned(out, q, c[0], c[1], tables, lens, D ** -0.5, plan, counters,
                                                         True, True) for c in caches])
print(json.dumps(dict(device=torch.cuda.get_device_name(), batch=B, context=CTX, attention_us=round(us, 1),
                      bytes_at_copy_rate_us=round(nbytes / bw * 1e6, 1), rel_err=round(rel_err(out, ref), 5),
                      parts=int(plan[1]), chunk=int(plan[0]))), flush=True)
del caches, kc, vc
llm = LLM("dummy:qwen3-8b", device="cuda", max_model_len=2048 + 16)
bd = kernel_breakdown(llm, 196, prompt_len=1536, steps=5)
print(json.dumps(dict(batch=196, prompt_len=1536, wall_ms=round(bd["wall_ms"], 3), gpu_ms=round(bd["gpu_ms"], 3),
                      kernels=[(k["name"][:60], round(k["ms_per_step"], 3), k["calls_per_step"])
                               for k in bd["kernels"][:10]])), flush=True)
