"""Issue 25: one 8k causal prefill (32 q / 8 kv heads, D 128, bf16) of each variant in VARIANTS (run.py) and of the
engine's wgmma_ws, between cudaProfilerStart / Stop, for Nsight Compute; from the repo root:
    ncu --clock-control none --profile-from-start off --set full -o $OUT/variants \\
        python results/kernel_experiments/wgmma_ws_overlap/ncu_variants.py
then `python results/kernel_experiments/wgmma_ws_overlap/ncu_variants.py --summarise $OUT/variants.ncu-rep`
writes the stall, tensor-pipe and throughput metrics of each kernel as JSON lines (ncu_h100.jsonl)."""
import csv
import io
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
KEYS = ("smsp__average_warps_issue_stalled_", "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
        "smsp__issue_active.avg.pct", "gpu__time_duration", "smsp__inst_executed.sum", "lts__throughput.avg",
        "l1tex__throughput.avg.pct_of_peak_sustained_active")  # metric names starting so


def profile(n: int = 8192, hq: int = 32, hk: int = 8, d: int = 128):
    from pdcli.benchmarks.kernels import make_paged
    from pdcli.kernels import build
    from run import VARIANTS, build_variant

    mod = build.load()
    exps = {name: build_variant(name) for name in VARIANTS}
    gen = torch.Generator(device="cuda").manual_seed(n)
    kc, vc, tables, k, v = make_paged(1, n, hk, d, 16, torch.bfloat16, gen)
    q = torch.randn(n, hq, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor([n], dtype=torch.int32, device="cuda")
    qsl = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    out, scale = torch.empty_like(q), d ** -0.5
    fns = [lambda: mod.prefill_attention_wgmma_ws(out, q, kc, vc, tables, lens, qsl, n, scale)]
    fns += [lambda m=m: m.run(out, q, kc, vc, tables, lens, qsl, n, scale) for m in exps.values()]
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for fn in fns:  # engine, then VARIANTS in order
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def summarise(rep: str):
    raw = subprocess.run(["ncu", "--import", rep, "--page", "raw", "--csv"], capture_output=True, text=True).stdout
    rows = list(csv.reader(io.StringIO(raw)))
    head, units = rows[0], rows[1]
    from run import VARIANTS

    for name, r in zip(("engine",) + VARIANTS, rows[2:]):
        out = {"kernel": name}
        for i, h in enumerate(head):
            if h.startswith(KEYS) and r[i] not in ("", "n/a"):
                out[h + (f" [{units[i]}]" if units[i] else "")] = r[i]
        print(json.dumps(out))


if __name__ == "__main__":
    summarise(sys.argv[2]) if sys.argv[1:2] == ["--summarise"] else profile()
