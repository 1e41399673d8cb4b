"""How much of a served run's TTFT and TPOT does the state at arrival explain? For each recorded run (mode, rate,
path), predictors are fitted on half of its requests (even arrival order) and scored on the other half: the
median of the fitted half (a constant), least squares on the recorded state (every worker load field the
decision recorded, the prompt's uncached tokens, the router's own raw prediction), and the mean of the 25
nearest fitted requests in that state (standardised). The router's calibrated prediction is scored on the same
half. A fit on the run's own outcomes knows more than the router can (the run's future, on average); where even
it misses by more than the router's bound, the state recorded at arrival does not hold what the bound needs.
CPU only -> results/router/state_fit_<device>.json.

    python -m pdcli.benchmarks.state_fit --device nvidia-h100-80gb-hbm3 results/router/h100_random_s1:18 ...
"""
from __future__ import annotations

import argparse

import numpy as np

from pdcli.benchmarks.results import provenance, write

LOAD_FIELDS = ("decode_batch", "decode_ctx", "queued_prefill_tokens", "queued_since_step_tokens", "since_step_ms",
               "inflight_transfers", "incoming_decodes", "neighbour_queued_tokens", "neighbour_decode_batch")
NEIGHBOURS = 25
MIN_REQUESTS = 100  # a bin of the router issue


def features(rec, roles: tuple[int, ...]) -> list[float]:
    """The state a request met: each of its workers' recorded load fields (since_step_ms also capped at 10 ms,
    near one decode step), its prompt's uncached tokens and length."""
    row = []
    for rank in roles:
        w = rec.loads[rank]
        for f in LOAD_FIELDS:
            row.append(float(getattr(w, f) or 0.0))
        row.append(min(float(w.since_step_ms or 0.0), 10.0))
    cached = rec.cached.get(rec.path, 0)
    return row + [float(rec.input_len - cached), float(rec.input_len)]


def _err(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.median(np.abs(pred - y) / y))


def fits(x: np.ndarray, raw: np.ndarray, cal: np.ndarray, y: np.ndarray) -> dict:
    """Held-out median |relative error| of each predictor (fitted on even rows, scored on odd ones)."""
    fit, test = np.arange(len(y)) % 2 == 0, np.arange(len(y)) % 2 == 1
    xa = np.column_stack([np.ones(len(y)), x, raw])
    beta, *_ = np.linalg.lstsq(xa[fit], y[fit], rcond=None)
    mu, sd = x[fit].mean(0), x[fit].std(0)
    z = (x - mu) / np.where(sd > 0, sd, 1.0)
    d = ((z[test][:, None, :] - z[fit][None, :, :]) ** 2).sum(-1)
    near = np.argsort(d, axis=1)[:, :NEIGHBOURS]
    knn = y[fit][near].mean(1)
    yt = y[test]
    return dict(requests=int(test.sum()), router=_err(cal[test], yt), router_raw=_err(raw[test], yt),
                constant=_err(np.full(len(yt), np.median(y[fit])), yt), linear=_err(xa[test] @ beta, yt),
                nearest=_err(knn, yt), measured_p50=float(np.median(yt)))


def run_rows(run, replayed) -> list[dict]:
    """One row per (path, metric) of a replayed run with recorded loads."""
    rows = []
    for path in sorted({x.record.path for x in replayed}):
        xs = [x for x in replayed if x.record.path == path and x.record.loads]
        for metric, measure in (("ttft", lambda r: r.ttft_ms), ("tpot", lambda r: r.tpot_ms)):
            xs_m = [x for x in xs if measure(x.record)]
            if len(xs_m) < MIN_REQUESTS:
                continue
            roles = tuple(dict.fromkeys(xs_m[0].record.workers))
            x = np.array([features(r.record, roles) for r in xs_m])
            y = np.array([measure(r.record) for r in xs_m], float)
            raw = np.array([r.raw[f"{metric}_ms"] for r in xs_m], float)
            cal = np.array([r.predicted[f"{metric}_ms"] for r in xs_m], float)
            rows.append(dict(file=run.file, mode=run.mode, rate=run.rate, path=path, metric=metric,
                             **fits(x, raw, cal, y)))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params-dir", default="profiles/nvidia-h100-80gb-hbm3/dummy-llama3-8b")
    ap.add_argument("--device", required=True, help="its name in the output file, e.g. nvidia-h100-80gb-hbm3")
    ap.add_argument("--out", default="results/router")
    ap.add_argument("folders", nargs="+", help="FOLDER or FOLDER:KNEE (its runs up to that rate, req/s)")
    args = ap.parse_args(argv)
    from pdcli.router.fit import load_cost_model
    from pdcli.router.replay import load_runs, replay_run, run_router

    cm = load_cost_model(args.params_dir)
    rows = []
    for arg in args.folders:
        folder, _, knee = arg.partition(":")
        for run in load_runs(folder):
            if run.rate > float(knee or "inf") or not any(r.loads for r in run.records):
                continue
            for r in run_rows(run, replay_run(run, run_router(run, cm))):
                rows.append(dict(r, folder=folder))
                print(f"{folder} {r['mode']} {r['rate']:g} {r['path']} {r['metric']}: router {r['router']:.3f} "
                      f"(raw {r['router_raw']:.3f}), constant {r['constant']:.3f}, linear {r['linear']:.3f}, "
                      f"nearest {r['nearest']:.3f} ({r['requests']} held out)")
    path = write(args.out, f"state_fit_{args.device}", dict(params_dir=args.params_dir, rows=rows,
                                                            provenance=provenance("pdcli.benchmarks.state_fit", argv)))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
