"""Decode attention over a batch of mixed context lengths, uniform against balanced split-KV: one long context
beside many short ones, as a server decodes bimodal traffic. With uniform splits every sequence is cut into the
same number of parts, so the long one's few CTAs run on after the short ones have finished (the step's tail);
balanced splits (a plan per step, parts of equal key counts) spread it over its share of the CTAs. Both are
checked against the fp32 reference and timed from CUDA graphs; the floor is the bytes of K and V over the
measured copy bandwidth.

    python -m pdcli.benchmarks.decode_mixed [--out results]   (GPU) -> results/decode_mixed_<device>.json

Where it came from: on one H100 the bimodal router runs' short requests decoded 8-20% slower than the simulator
(the cost model, which prices a step by its summed context) when a long request decoded beside them, and as
predicted (0.98-1.02x) when none did (2026-12-05, docs/perf-notes.md).
"""
from __future__ import annotations

import argparse
import sys

import torch

from pdcli.benchmarks.device import copy_bandwidth, device_slug
from pdcli.benchmarks.kernels import graph_us, rel_err
from pdcli.benchmarks.results import provenance, write
from pdcli.kernels import build, ops, reference

# (short sequences, their context, the long one's context): bimodal's decode batches on one GPU (256-token
# prompts beside an 8k-12k one), a larger batch, and a long-context extreme
CASES = ((40, 400, 10_500), (128, 600, 12_000), (16, 300, 32_000), (64, 4096, 4096))


def paged_mixed(lens: list[int], hk: int, d: int, block_size: int, dtype, gen):
    """A paged cache holding sequences of these lengths in shuffled blocks, and their block tables."""
    need = [-(-c // block_size) for c in lens]
    n = sum(need)
    kc = torch.randn(n, block_size, hk, d, generator=gen, device="cuda").to(dtype)
    vc = torch.randn(n, block_size, hk, d, generator=gen, device="cuda").to(dtype)
    perm = torch.randperm(n, generator=gen, device="cuda").int()
    tables = torch.zeros(len(lens), max(need), dtype=torch.int32, device="cuda")
    at = 0
    for b, m in enumerate(need):
        tables[b, :m] = perm[at:at + m]
        at += m
    return kc, vc, tables


def bench_mixed(mod, short: int, short_ctx: int, long_ctx: int, copy_bw: float, hq=32, hk=8, d=128, block_size=16,
                dtype=torch.bfloat16) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(short * 31 + long_ctx)
    lens_list = [long_ctx] + [short_ctx] * short
    kc, vc, tables = paged_mixed(lens_list, hk, d, block_size, dtype, gen)
    lens = torch.tensor(lens_list, dtype=torch.int32, device="cuda")
    b = len(lens_list)
    q = torch.randn(b, hq, d, generator=gen, device="cuda", dtype=dtype)
    scale = d ** -0.5
    qsl = torch.arange(b + 1, dtype=torch.int32, device="cuda")
    ref32 = reference.paged_attention_fp32_chunked(q, kc, vc, tables, lens, qsl, scale)
    ref16 = torch.cat([reference.paged_attention(q[rows], kc, vc, tables[rows], lens[rows], qsl[:rows.stop - rows.start + 1], 1,
                                                 int(lens[rows].max()), scale)
                       for rows in (slice(0, 1), slice(1, b))])  # the long row, then the short ones: no padding
    bound = 2 * rel_err(ref16, ref32) + 1e-3
    splits = mod.decode_attention_num_splits(b, hk, long_ctx, d)
    out = {k: torch.full_like(q, float("nan")) for k in ("uniform", "balanced")}

    def uniform():
        mod.decode_attention(out["uniform"], q, kc, vc, tables, lens, scale, 0, long_ctx)

    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    # the plan's target parts per kv head: the uniform split's CTA count, or a whole number of SM waves
    targets = {"uniform_ctas": b * splits, "sms_x1": sms // hk, "sms_x2": 2 * sms // hk, "sms_x4": 4 * sms // hk}
    plans = {name: mod.decode_plan(lens, t) for name, t in targets.items()}  # once per engine step: timed apart
    engine_target = ops.decode_plan_target(mod, hk, d)
    targets["engine"] = engine_target[0]
    plans["engine"] = mod.decode_plan(lens, *engine_target)  # what the engine plans (ops.decode_fn)

    def balanced(name):  # one layer's attention with the step's plan
        return lambda: mod.decode_attention_planned(out["balanced"], q, kc, vc, tables, lens, scale, plans[name])

    row = dict(short_seqs=short, short_ctx=short_ctx, long_ctx=long_ctx, hq=hq, hk=hk, head_dim=d, dtype=str(dtype),
               uniform_splits=splits, balanced_targets=targets)
    nbytes = 2 * sum(lens_list) * hk * d * dtype.itemsize
    row["floor_us"] = nbytes / copy_bw * 1e6
    runs = [("uniform", "uniform", uniform)] + [(f"balanced_{n}", "balanced", balanced(n)) for n in targets]
    for name, buf, fn in runs:
        out[buf].fill_(float("nan"))
        fn()
        torch.cuda.synchronize()
        err = rel_err(out[buf], ref32)
        row[f"{name}_us"] = graph_us([fn])
        row[f"{name}_rel_err"] = err
        row[f"{name}_correct"] = bool(err <= bound and not out[buf].isnan().any())
    row["plan_us"] = graph_us([lambda: mod.decode_plan(lens, *engine_target)])
    best = min(targets, key=lambda n: row[f"balanced_{n}_us"])
    row["balanced_best"] = best
    row["balanced_us"] = row["balanced_engine_us"]
    row["balanced_correct"] = all(row[f"balanced_{n}_correct"] for n in targets)
    row["speedup"] = row["uniform_us"] / row["balanced_us"]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: the decode benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    mod = build.load()
    copy_bw = copy_bandwidth()
    rows = []
    for short, short_ctx, long_ctx in CASES:
        r = bench_mixed(mod, short, short_ctx, long_ctx, copy_bw)
        rows.append(r)
        print(f"{short} x {short_ctx} + 1 x {long_ctx}: uniform ({r['uniform_splits']} splits) {r['uniform_us']:7.1f} us, "
              f"balanced " + ", ".join(f"{n} {r[f'balanced_{n}_us']:.1f}" for n in r['balanced_targets']) +
              f" us (best {r['speedup']:.2f}x; its plan {r['plan_us']:.1f} us per step), "
              f"floor {r['floor_us']:6.1f} us; "
              f"correct {r['uniform_correct']}/{r['balanced_correct']}", flush=True)
    path = write(args.out, f"decode_mixed_{device_slug()}",
                 dict(device=torch.cuda.get_device_name(), copy_bw_bytes_s=copy_bw, rows=rows,
                      provenance=provenance("pdcli.benchmarks.decode_mixed", argv, source_hash=build.source_hash()[:16])))
    print(f"wrote {path}")
    return 0 if all(r["uniform_correct"] and r["balanced_correct"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
