"""Where the cost model misses in served runs: each collocated bimodal run's own trace (arrivals, lengths) is
simulated with the profile it ran with (`pdcli plan`'s simulator: step times from the cost model, which prices a
decode step by its batch and summed context), and every short request's measured TPOT is set against its
simulated one, split by what ran beside its decode: how many long prompts' prefills landed during it (k), and,
among those with none, how much of its decode a long request was decoding beside it. A ratio near 1 is a step
the model prices right; a ratio that grows with a neighbour is a cost the model does not have. With --mode
disaggregated: the same for the disaggregated runs' decode worker (k: long prefills on its MPS neighbour). With
--ttft: each disaggregated run's requests' TTFT against their simulated one instead (a prefill worker beside its
MPS decode neighbour), split by prompt length. CPU only; seconds.

    python -m pdcli.benchmarks.sim_residuals --params-dir DIR --device D FOLDER... -> results/router/sim_residuals_<D>.json
    python -m pdcli.benchmarks.sim_residuals --mode disaggregated ... -> results/router/sim_residuals_<D>_disaggregated.json
    python -m pdcli.benchmarks.sim_residuals --ttft ... -> results/router/sim_residuals_ttft_<D>.json
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from pdcli.benchmarks.results import provenance, write

LONG = 1000  # prompt tokens: bimodal's long prompts are 8k-12k, its short ones 256


def run_residuals(run, cm) -> dict:
    """Median measured / simulated TPOT of the run's short requests after the warm-up, by neighbours."""
    from pdcli.plan.validate import simulate_records

    sim = simulate_records(run, cm)
    longs = [r for r in run.records if r.ok and r.input_len >= LONG]
    by_k, by_overlap = {}, {}
    for r, o in zip(run.records, sim):
        if not r.ok or r.arrival < 5 or r.input_len >= LONG or r.output_len < 2:
            continue
        ratio = r.tpot_ms / o.tpot_ms
        k = sum(1 for x in longs if x.first > r.first and x.arrival < r.end)  # long prefills during its decode
        by_k.setdefault(min(k, 3), []).append(ratio)
        if k == 0:
            beside = sum(max(0.0, min(r.end, x.end) - max(r.first, x.first)) for x in longs) / (r.end - r.first)
            by_overlap.setdefault("none" if beside == 0 else "under half" if beside < 0.5 else "half or more",
                                  []).append(ratio)
    summary = lambda d: {str(k): dict(requests=len(v), measured_over_simulated=float(np.median(v)))  # noqa: E731
                         for k, v in sorted(d.items(), key=lambda kv: str(kv[0]))}
    return dict(file=run.file, mode=run.mode, rate=run.rate, by_long_prefills=summary(by_k),
                no_long_prefill_by_long_decode_beside=summary(by_overlap))


def ttft_residuals(run, cm) -> dict:
    """Measured / simulated TTFT of the run's requests after the warm-up, short and long prompts apart: median and
    10th / 90th percentiles."""
    from pdcli.plan.validate import simulate_records

    by_len = {}
    for r, o in zip(run.records, simulate_records(run, cm)):
        if r.ok and o.ok and r.arrival >= 5:
            by_len.setdefault("long" if r.input_len >= LONG else "short", []).append(r.ttft_ms / o.ttft_ms)
    return dict(file=run.file, mode=run.mode, rate=run.rate,
                measured_over_simulated={k: dict(requests=len(v), median=float(np.median(v)),
                                                 p10=float(np.percentile(v, 10)), p90=float(np.percentile(v, 90)))
                                         for k, v in sorted(by_len.items())})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params-dir", required=True)
    ap.add_argument("--device", required=True, help="its name in the output file, e.g. nvidia-h100-80gb-hbm3")
    ap.add_argument("--out", default="results/router")
    ap.add_argument("--ttft", action="store_true", help="the disaggregated runs' TTFT (a prefill worker's) instead")
    ap.add_argument("--mode", default="collocated", choices=("collocated", "disaggregated"),
                    help="whose short requests' TPOT: a disaggregated run's decode worker beside its MPS prefill "
                         "neighbour (k counts the long prefills on the prefill worker)")
    ap.add_argument("folders", nargs="+")
    args = ap.parse_args(argv)
    from pdcli.router.fit import load_cost_model
    from pdcli.router.replay import load_runs

    cm = load_cost_model(args.params_dir)
    if args.ttft:
        rows = [ttft_residuals(run, cm) for folder in args.folders for run in load_runs(folder)
                if run.mode == "disaggregated"]
        for r in rows:
            print(f"{r['file']}: " + ", ".join(f"{k} {v['median']:.3f} (p10 {v['p10']:.3f}, p90 {v['p90']:.3f}, "
                                               f"{v['requests']})" for k, v in r["measured_over_simulated"].items()))
        path = write(args.out, f"sim_residuals_ttft_{args.device}", dict(
            params_dir=args.params_dir, rows=rows, provenance=provenance("pdcli.benchmarks.sim_residuals", argv)))
        print(f"wrote {path}")
        return
    rows = [run_residuals(run, cm) for folder in args.folders for run in load_runs(folder)
            if run.mode == args.mode and any(r.input_len >= LONG for r in run.records)]
    for r in rows:
        beside = r["no_long_prefill_by_long_decode_beside"]
        print(f"{r['file']}: k " + ", ".join(f"{k}: {v['measured_over_simulated']:.2f}" for k, v in
                                            r["by_long_prefills"].items()) + " | no long prefill, long decode beside "
              + ", ".join(f"{k}: {v['measured_over_simulated']:.2f} ({v['requests']})" for k, v in beside.items()))
    name = f"sim_residuals_{args.device}" + ("" if args.mode == "collocated" else f"_{args.mode}")
    path = write(args.out, name, dict(params_dir=args.params_dir, rows=rows,
                                                               provenance=provenance("pdcli.benchmarks.sim_residuals", argv)))
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
