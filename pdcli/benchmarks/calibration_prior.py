"""How much TPOT calibration should trust its residuals: every committed run the issues name (model_check's
REPLAY_RUNS, each with the profile it ran with) replayed with TPOT's prior at several weights (pseudo-observations
at the fitted model's price), per (run, path) bin of >= 60 requests: the median |relative error| of TPOT and the
share of bins whose predictions fall below the measurement outside 35-65% (biased). CPU only; about a minute.

    python -m pdcli.benchmarks.calibration_prior [--weights 4,16,64,256,1024] -> results/router/calibration_prior.json
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from pdcli.benchmarks.results import provenance, write

MIN_REQUESTS = 60  # per (run, path) bin


def replay_bins(weight: float, runs) -> list[dict]:
    from pdcli.router.calibration import CalibrationConfig
    from pdcli.router.fit import load_cost_model
    from pdcli.router.replay import errors, load_runs, replay_run, run_router

    config = CalibrationConfig(ratio_prior_weight=weight)
    rows = []
    for folder, params in runs:
        cm = load_cost_model(params)
        for run in load_runs(folder):
            replayed = replay_run(run, run_router(run, cm, calibration=config))
            for path in sorted({x.record.path for x in replayed}):
                xs = [x for x in replayed if x.record.path == path]
                e = errors(xs)
                if len(xs) >= MIN_REQUESTS and e.get("tpot_err") is not None:
                    rows.append(dict(folder=folder, mode=run.mode, rate=run.rate, path=path, num_requests=len(xs),
                                     tpot_err=e["tpot_err"], tpot_below=e["tpot_below"], ttft_err=e.get("ttft_err")))
    return rows


def summarize(rows: list[dict]) -> dict:
    t = np.array([r["tpot_err"] for r in rows])
    b = np.array([r["tpot_below"] for r in rows])
    return dict(bins=len(rows), tpot_err_median=float(np.median(t)), tpot_err_p90=float(np.quantile(t, 0.9)),
                biased_bin_share=float(np.mean((b < 0.35) | (b > 0.65))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="4,16,64,256,1024")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    from pdcli.benchmarks.model_check import REPLAY_RUNS

    out = {}
    for w in (float(x) for x in args.weights.split(",")):
        rows = replay_bins(w, REPLAY_RUNS)
        out[f"{w:g}"] = dict(summary=summarize(rows), rows=rows)
        s = out[f"{w:g}"]["summary"]
        print(f"TPOT prior {w:6g}: {s['bins']} bins, median TPOT error {s['tpot_err_median']:.3f}, p90 "
              f"{s['tpot_err_p90']:.3f}, biased bins {s['biased_bin_share']:.2f}", flush=True)
    path = write(args.out + "/router", "calibration_prior", dict(runs=dict(REPLAY_RUNS), weights=out,
                                                                  provenance=provenance(
                                                                      "pdcli.benchmarks.calibration_prior", argv)))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
