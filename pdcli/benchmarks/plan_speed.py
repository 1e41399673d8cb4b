"""How long `pdcli plan` takes on this CPU (issue 21: 60 s of simulated traffic for 8 GPUs at the committed
2-GPU sweeps' rates scaled by 4 in under 30 s on one core): the slowest layout, adaptive over 8 collocated
workers, at 64-320 req/s, and every layout of 8 GPUs (4 per node) at 4 rates, 60 s of arrivals each, with the
committed H100 profile -> results/plan_speed_cpu.json. Pin it to one core with `taskset -c 0`."""
from __future__ import annotations

import argparse
import os
import sys
import time

from pdcli.benchmarks.results import provenance, write

PROFILE = "profiles/nvidia-h100-80gb-hbm3/dummy-llama3-8b"


def timed_plan(layouts: str | None, rates: list[float], gpus: int = 8, gpus_per_node: int = 4) -> dict:
    from pdcli.cli.plan import _layouts, _runner
    from pdcli.plan.search import at_rates
    from pdcli.router.fit import load_cost_model

    cm = load_cost_model(PROFILE)
    lays = _layouts(layouts, gpus, gpus_per_node)
    run = _runner(cm, "random", 60.0, 0, dict(ttft=300.0, tpot=25.0), 1.0, 400.0, 300.0, 25.0, 0.0)
    start = time.perf_counter()
    rows = at_rates(lays, rates, run)
    return dict(layouts=[lay.name for lay in lays], rates=rates, seconds=time.perf_counter() - start,
                simulated_requests=sum(r["num_prompts"] for r in rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    slowest = timed_plan("adaptive-8C", [64.0, 128.0, 192.0, 256.0, 320.0])
    print(f"adaptive-8C at 64-320 req/s: {slowest['seconds']:.1f} s")
    every = timed_plan(None, [64.0, 128.0, 192.0, 256.0])
    print(f"{len(every['layouts'])} layouts at 4 rates: {every['seconds']:.1f} s")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    path = write(args.out, "plan_speed_cpu", dict(summary=dict(slowest_layout_s=slowest["seconds"],
                                                               all_layouts_s=every["seconds"], cores=cores),
                                                  slowest=slowest, all_layouts=every,
                                                  provenance=provenance("pdcli.benchmarks.plan_speed", argv)))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
