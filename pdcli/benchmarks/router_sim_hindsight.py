"""The committed H200 bimodal runs' TPOT decomposition (router_summary's `tpot_hindsight`) reproduced in `pdcli
plan`'s simulator, where the cost model is exact by construction: each committed collocated run's own trace (its
recorded arrivals and lengths, as `pdcli plan --validate` simulates them), and fresh traces from bench's generators
at the same rates, burstiness, SLOs and length of arrivals (one collocated worker, other seeds). If the simulated
runs show the measured runs' TPOT per long prefill met and the router's error, the error is the workload's (which
long prompts come during a request's life), not the cost model's. CPU only ->
results/router/sim_hindsight_<device>.json.

    python -m pdcli.benchmarks.router_sim_hindsight [--params-dir DIR] [--seeds 32,33] [--duration 30] [RUN_DIR ...]
"""
from __future__ import annotations

import argparse
import sys

from pdcli.bench import result_files
from pdcli.benchmarks.results import provenance, write
from pdcli.benchmarks.router_floor import (MAX_MODEL_LEN, PROFILE, SLO, VOCAB,  # one H200 profile, the SLOs
                                           one_collocated_gpu, slo_router)

CASES = ((0.5, (4.0, 4.5, 5.0, 5.5, 6.0)), (1.0, (4.5, 5.0, 5.5)))  # (burstiness, rates): the committed runs'
RUNS = ("results/router/h200_bimodal_b0.5", "results/router/h200_bimodal")
WARMUP_S = 5.0  # requests before this are not scored, as the runs' warm-up


def one_run(cm, burstiness: float, rate: float, seed: int, duration: float) -> dict:
    """A fresh trace from bench's generators (prompts drawn with the seed itself), simulated and replayed."""
    from pdcli.bench.arrivals import arrival_times
    from pdcli.bench.runner import prompt_seed
    from pdcli.bench.workloads import make_requests

    n = int(rate * duration)
    reqs = make_requests("bimodal", n, prompt_seed(seed, 0), VOCAB, MAX_MODEL_LEN)
    return dict(trace=f"generated, seed {seed}", **simulated(cm, burstiness, rate, [len(r.prompt_ids) for r in reqs],
                                                            [r.output_len for r in reqs],
                                                            arrival_times(n, rate, burstiness, seed)), seed=seed)


def recorded_run(cm, path: str) -> dict:
    """A committed run's own trace (arrivals, prompt and output lengths), simulated and replayed."""
    d = result_files.read(path)
    reqs = sorted(d["requests"], key=lambda q: q["arrival"])
    return dict(trace=path, **simulated(cm, float(d["burstiness"]), float(d["request_rate"]),
                                        [q["input_len"] for q in reqs], [q["output_len"] for q in reqs],
                                        [q["arrival"] for q in reqs]), seed=d.get("seed"))


def simulated(cm, burstiness: float, rate: float, prompt_lens, output_lens, arrivals) -> dict:
    from pdcli.bench.metrics import summarize
    from pdcli.benchmarks.router_summary import tpot_hindsight
    from pdcli.plan.simulator import Simulator
    from pdcli.router.replay import errors, replay_run, simulated_run

    layout = one_collocated_gpu()
    recs = Simulator(cm, list(layout.specs), layout.mode).run(list(prompt_lens), list(output_lens), arrivals)
    run = simulated_run(layout.specs, layout.mode, rate, recs, SLO)
    replayed = replay_run(run, slo_router(cm))
    scored = [x for x in replayed if x.record.arrival >= WARMUP_S]
    err = errors(scored)
    return dict(burstiness=burstiness, rate=rate, num_scored=len(scored),
                slo_attainment=summarize(recs, SLO)["slo_attainment"], router_tpot_err=err.get("tpot_err"),
                router_tpot_below=err.get("tpot_below"), router_ttft_err=err.get("ttft_err"),
                tpot_hindsight=tpot_hindsight(run, cm, scored))


def _print(r: dict) -> None:
    by_k = r["tpot_hindsight"].get("measured_over_hindsight_by_long_prefills", {})
    print(f"b={r['burstiness']:g} {r['rate']:4.1f} req/s {r['trace'][-40:]}: router TPOT error "
          f"{r['router_tpot_err']:.3f} ({r['router_tpot_below']:.2f} below); measured / hindsight price by long "
          "prefills met: "
          + ", ".join(f"{k}: {v['median']:.2f} ({v['requests']})" for k, v in by_k.items()), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params-dir", default=PROFILE)
    ap.add_argument("runs", nargs="*", default=list(RUNS), help="folders of committed bimodal runs (collocated ones)")
    ap.add_argument("--seeds", default="32,33")
    ap.add_argument("--duration", type=float, default=30.0, help="s of arrivals per run (the committed runs': 30)")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    from pdcli.router.fit import load_cost_model

    cm = load_cost_model(args.params_dir)
    rows = []
    for folder in args.runs:
        for path in result_files.find(folder, "*collocated_bimodal*"):
            if not result_files.read(path).get("requests"):
                continue
            rows.append(recorded_run(cm, path))
            _print(rows[-1])
    for burstiness, rates in CASES:
        for rate in rates:
            for seed in (int(s) for s in args.seeds.split(",")):
                rows.append(one_run(cm, burstiness, rate, seed, args.duration))
                _print(rows[-1])
    path = write(args.out + "/router", "sim_hindsight_" + args.params_dir.rstrip("/").split("/")[-2],
                 dict(params_dir=args.params_dir, slo=SLO, duration_s=args.duration, rows=rows,
                      provenance=provenance("pdcli.benchmarks.router_sim_hindsight", argv)))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
