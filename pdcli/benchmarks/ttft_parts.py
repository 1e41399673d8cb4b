"""Where a request's time to first token goes, from runs made with `bench --save-detailed` since 2026-12-05 evening
(each request records when the coordinator took it, when its prompt went to a worker and when that worker took it;
one host's clock): the wait to be submitted, the routing, the pipe to the worker, and the worker's part until the
first token reached the coordinator, beside the simulator's TTFT on the run's own trace. Medians per run, apart for
the requests whose worker had no prompt queued when they came (the simulator's TTFT ran 3-5 ms under those on one
H100, ~0 under the others). Runs since 2026-12-05 night also mark, on the worker, the step with the prompt's first
tokens (`launched`) and the landing of its first token (`landed`): the worker's part splits into its wait, compute
and report. The runs of 21:19-21:36 UTC that night marked `launched` when the step's launch had ended (a
launch-bound 256-token prefill's ~9 ms launch fell in the wait); since, when it began.

    python -m pdcli.benchmarks.ttft_parts --params-dir DIR FOLDER... [--out results/router]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from pdcli.bench import result_files
from pdcli.benchmarks.results import provenance, write

PARTS = ("submit", "route", "pipe", "worker")  # ms: arrival -> submitted -> dispatched -> received -> first token
WORKER_PARTS = ("wait", "compute", "report")  # the worker's: received -> launched -> landed -> first token
SIM_PARTS = ("wait", "compute")  # the simulator's: arrival -> launched (the dispatch in) -> first token (the report in)


def parts_ms(q: dict) -> dict | None:
    """A recorded request's TTFT split into PARTS (ms), and the worker's part into WORKER_PARTS where the run
    records when its first prompt tokens' step launched and its first token's step landed (since 2026-12-05
    night); None without the times (older runs) or a first token."""
    if q.get("ttft_ms") is None or any(q.get(k) is None for k in ("submitted", "dispatched", "received")):
        return None
    first = q["arrival"] + q["ttft_ms"] / 1e3
    marks = [q["arrival"], q["submitted"], q["dispatched"], q["received"], first]
    out = {p: (b - a) * 1e3 for p, a, b in zip(PARTS, marks, marks[1:])}
    if q.get("launched") is not None and q.get("landed") is not None:
        marks = [q["received"], q["launched"], q["landed"], first]
        out.update({p: (b - a) * 1e3 for p, a, b in zip(WORKER_PARTS, marks, marks[1:])})
    return out


def sim_parts_ms(r) -> dict | None:
    """A simulated RequestRecord's TTFT split into SIM_PARTS (ms): no host in between."""
    if r.first_token is None or r.launched is None:
        return None
    return dict(wait=(r.launched - r.arrival) * 1e3, compute=(r.first_token - r.launched) * 1e3)


def queue_empty(q: dict) -> bool | None:
    """Whether the worker that prefilled it held no prompt tokens when it came (from the recorded loads)."""
    loads = (q.get("decision") or {}).get("loads") or {}
    w = loads.get(str((q.get("workers") or [None])[0])) or loads.get((q.get("workers") or [None])[0])
    return None if w is None else not w.get("queued_prefill_tokens")


def run_parts(d: dict, sim_ttft_ms: list[float] | None = None, sim_parts: list[dict | None] | None = None) -> dict:
    """Per group (all, queue_empty, queue_held) the medians of PARTS (and WORKER_PARTS where recorded), of the
    measured TTFT and, given the simulated TTFT and sim_parts_ms of each request (in the order of
    d["requests"]), of the simulated ones (sim_<part>_ms)."""
    out = {}
    reqs = d.get("requests") or []
    parts = [parts_ms(q) for q in reqs]
    for group, keep in (("all", lambda q: True), ("queue_empty", lambda q: queue_empty(q) is True),
                        ("queue_held", lambda q: queue_empty(q) is False)):
        idx = [i for i, q in enumerate(reqs) if keep(q) and parts[i] is not None]
        if not idx:
            continue
        row = dict(num_requests=len(idx), ttft_ms=float(np.median([reqs[i]["ttft_ms"] for i in idx])))
        for p in PARTS + WORKER_PARTS:
            got = [parts[i].get(p) for i in idx]
            if all(x is not None for x in got):
                row[f"{p}_ms"] = float(np.median(got))
        if sim_ttft_ms is not None:
            row["sim_ttft_ms"] = float(np.median([sim_ttft_ms[i] for i in idx]))
        for p in SIM_PARTS if sim_parts is not None else ():
            got = [sim_parts[i][p] for i in idx if sim_parts[i] is not None]
            if got:
                row[f"sim_{p}_ms"] = float(np.median(got))
        out[group] = row
    return out


def main(argv: list[str] | None = None) -> None:
    from pdcli.plan.validate import simulate_records
    from pdcli.router.fit import load_cost_model
    from pdcli.router.replay import load_runs

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--params-dir", required=True, help="the profile the runs ran with (the simulator's steps)")
    ap.add_argument("--out", default="results/router")
    args = ap.parse_args(argv)
    cm, rows = load_cost_model(args.params_dir), []
    for folder in args.folders:
        for run in load_runs(folder):
            d = result_files.read(run.file)
            by_arrival = sorted(range(len(d["requests"])), key=lambda i: d["requests"][i]["arrival"])
            sims = simulate_records(run, cm)  # in run.records' order: arrival order
            sim, sim_parts = [0.0] * len(sims), [None] * len(sims)
            for i, s in zip(by_arrival, sims):
                sim[i] = s.ttft_ms if s.first_token is not None else float("nan")
                sim_parts[i] = sim_parts_ms(s)
            got = run_parts(d, sim, sim_parts)
            if got:
                rows.append(dict(file=run.file, mode=run.mode, rate=run.rate, **got))
                print(f"{run.file}: {got.get('all')}")
    if not rows:
        sys.exit("ttft_parts: no run here records when its requests were submitted, dispatched and received")
    device = result_files.read(rows[0]["file"])["provenance"].get("device", "unknown")
    name = "ttft_parts_" + str(device).lower().replace(" ", "-")
    print(write(args.out, name, dict(params_dir=args.params_dir, rows=rows,
                                     provenance=provenance("pdcli.benchmarks.ttft_parts", argv))))


if __name__ == "__main__":
    main(sys.argv[1:])
