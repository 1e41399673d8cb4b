"""The decode step's attention at batch 64 / 256 and contexts 256-282 (the engine benchmark's), through the balanced
plan three ways: one wave of CTAs taking parts in turn (the engine's), a CTA per part, and uniform splits; CUDA-graph
replays over caches cycled past L2, against the bytes at the copy rate. With --ncu-once: one planned persistent
call only, for `ncu --kernel-name regex:persistent` (where its remaining time goes). From the repo root with
PYTHONPATH=$PWD: python results/kernel_experiments/decode_persistent/short_ctx.py [--ncu-once]"""
import json
import sys

import torch

from pdcli.benchmarks.kernels import copies_past_l2, graph_us, make_paged
from pdcli.config import CacheConfig
from pdcli.kernels import build, ops

mod = build.load()
HQ, HK, D, BS = 32, 8, 128, CacheConfig().block_size  # the engine's


def case(batch: int, gen):
    lens_list = [256 + (7 * i) % 27 for i in range(batch)]  # 256-282, as the engine benchmark's steps see
    ctx = max(lens_list)
    kc, vc, tables, _, _ = make_paged(batch, ctx, HK, D, BS, torch.bfloat16, gen)
    q = torch.randn(batch, HQ, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor(lens_list, dtype=torch.int32, device="cuda")
    return q, kc, vc, tables, lens


def run(batch: int, gen) -> dict:
    q, kc, vc, tables, lens = case(batch, gen)
    out, scale = torch.empty_like(q), D ** -0.5
    target = ops.decode_plan_target(mod, HK, D)
    plan = mod.decode_plan(lens, *target)
    counters = torch.zeros(batch * HK, dtype=torch.int32, device="cuda")
    nbytes, max_ctx = 2 * int(lens.sum()) * HK * D * 2, int(lens.max())  # host values: none inside a capture
    caches = [(kc, vc)] + [(kc.clone(), vc.clone()) for _ in range(copies_past_l2(nbytes) - 1)]
    row = {"batch": batch, "keys": int(lens.sum()), "mbytes": round(nbytes / 1e6, 1)}
    ways = {"persistent": lambda c: mod.decode_attention_planned(out, q, c[0], c[1], tables, lens, scale, plan,
                                                                 counters, True, True),
            "cta_per_part": lambda c: mod.decode_attention_planned(out, q, c[0], c[1], tables, lens, scale, plan,
                                                                   counters, True, False),
            "uniform": lambda c: mod.decode_attention(out, q, c[0], c[1], tables, lens, scale, 0, max_ctx)}
    for name, fn in ways.items():
        row[f"{name}_us"] = round(graph_us([lambda c=c, fn=fn: fn(c) for c in caches]), 2)
    return row


if __name__ == "__main__":
    gen = torch.Generator(device="cuda").manual_seed(0)
    if "--ncu-once" in sys.argv:
        q, kc, vc, tables, lens = case(64, gen)
        plan = mod.decode_plan(lens, *ops.decode_plan_target(mod, HK, D))
        counters = torch.zeros(64 * HK, dtype=torch.int32, device="cuda")
        mod.decode_attention_planned(torch.empty_like(q), q, kc, vc, tables, lens, D ** -0.5, plan, counters, True,
                                     True)
        torch.cuda.synchronize()
        sys.exit(0)
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_bw = 2 * src.numel() / (graph_us([lambda: dst.copy_(src)], calls=5) * 1e-6)
    print(json.dumps({"device": torch.cuda.get_device_name(), "copy_bw_gb_s": round(copy_bw / 1e9)}), flush=True)
    for batch in (64, 256):
        r = run(batch, gen)
        r["bytes_at_copy_rate_us"] = round(r["mbytes"] * 1e6 / copy_bw * 1e6, 2)
        print(json.dumps(r), flush=True)
