"""Issue 20's figures from the committed sweeps of one device, in one command: per sweep folder (one workload,
every mode and rate in it) the highest rate with >= 90% SLO attainment per mode, the knee (the best static
mode's), and in every bin below the knee the router's errors, replayed (`pdcli replay`) and as recorded online,
and the share of the least used path -> results/router_<device>.json with a `summary`. CPU only; seconds.

  python -m pdcli.benchmarks.router_summary --device nvidia-h200 --params-dir profiles/nvidia-h200/dummy-llama3-8b \
      results/router/h200_bimodal_b0.5 results/router/h200_bimodal=profiles/OTHER ...

A folder replays with the profile its runs ran with: --params-dir, or the one named after `=`. A device's
arguments are kept one a line in results/router/summary_<device>.args: `router_summary @THAT_FILE`.
"""
from __future__ import annotations

import argparse
import os
import sys

from pdcli.bench import result_files
from pdcli.benchmarks.results import provenance, write

STATIC = ("collocated", "disaggregated")
LONG_PROMPT = 4000  # tokens: bimodal's long prompts (8k-12k), whose prefill stalls the decode steps it rides in
MIN_BIN_REQUESTS = 100  # the definition: a load bin needs this many requests (measured, warm-up excluded)
BELOW_BAND = (0.35, 0.65)  # acceptance 1: the share of a bin's predictions under the measurement


def highest_rate(rows: list[dict]) -> float | None:
    """The highest rate of these rows with >= 90% SLO attainment (bench's max_rate_meeting)."""
    from pdcli.bench.metrics import max_rate_meeting

    return max_rate_meeting([dict(request_rate=r["rate"], slo_attainment=r["slo_attainment"] or 0) for r in rows])


def sweep(folder: str, cm) -> dict:
    """One folder: a row per (mode, rate) with its attainment, errors and path shares; each mode's highest rate."""
    from pdcli.router.replay import errors, load_runs, replay_run, run_router

    rows, workloads = [], set()
    for run in load_runs(folder):
        d = result_files.read(run.file)
        workloads.add((d.get("workload"), d.get("burstiness")))
        replayed = replay_run(run, run_router(run, cm))
        skip = sorted(r.arrival for r in run.records)[:d.get("num_warmup_excluded", 0)]
        after = [x for x in replayed if not skip or x.record.arrival > skip[-1]]  # warm-up excluded, as measured
        rep = errors(after)
        rows.append(dict(mode=run.mode, rate=run.rate, seed=d.get("seed"), file=os.path.basename(run.file),
                         num_requests=d.get("completed"), num_measured=len(after),
                         bin=len(after) >= MIN_BIN_REQUESTS, slo_attainment=d.get("slo_attainment"),
                         routing_mix=d.get("routing_mix"),
                         kv_capacity_tokens={str(w["rank"]): w.get("kv_capacity_tokens") for w in d["layout"]},
                         replay_ttft_err=rep.get("ttft_err"), replay_ttft_below=rep.get("ttft_below"),
                         replay_tpot_err=rep.get("tpot_err"), replay_tpot_below=rep.get("tpot_below"),
                         online_ttft_err=d.get("router_ttft_median_abs_rel_err"),
                         online_tpot_err=d.get("router_tpot_median_abs_rel_err"),
                         tpot_by_long_prefills=tpot_by_long_prefills(run, after),
                         tpot_hindsight=tpot_hindsight(run, cm, after),
                         long_tpot_over_raw=_median([x.record.tpot_ms / x.raw["tpot_ms"] for x in after
                                                     if x.record.tpot_ms and x.record.input_len > LONG_PROMPT])))
    modes = sorted({r["mode"] for r in rows})
    highest = {m: highest_rate([r for r in rows if r["mode"] == m]) for m in modes}
    statics = [highest[m] for m in STATIC if highest.get(m) is not None]
    knee = max(statics) if statics else None
    (workload, burstiness), = workloads or {(None, None)}  # one workload and arrival process a folder
    return dict(folder=folder, workload=workload, burstiness=burstiness, highest_rate=highest, knee=knee, rows=rows)


def tpot_by_long_prefills(run, replayed) -> dict:
    """Measured over predicted TPOT of the short requests, by how many long prompts' prefills landed during their
    decode (known only in hindsight: the prediction is the mean over these futures). Empty without long prompts."""
    import numpy as np

    longs = [(r.arrival, r.first) for r in run.records if r.input_len > LONG_PROMPT and r.ok]
    if not longs:
        return {}
    by: dict[int, list[float]] = {}
    for x in replayed:
        r = x.record
        if r.tpot_ms and r.input_len <= LONG_PROMPT:
            n = sum(1 for a, f in longs if f > r.first and a < r.end)
            by.setdefault(min(n, 3), []).append(r.tpot_ms / x.predicted["tpot_ms"])
    return {str(n): dict(requests=len(v), measured_over_predicted_median=float(np.median(v))) for n, v in sorted(by.items())}


def tpot_hindsight(run, cm, replayed, samples: int = 32) -> dict:
    """What the short requests' TPOT comes to priced in hindsight: the cost model's decode step at the batch and
    context each one actually decoded beside (from the records, sampled over its life), against its measured
    TPOT, split by how many long prompts' prefills landed during its decode (k). `known_k_err`: the median
    |rel. error| of a prediction that knew the realized batch and k (each k's median ratio); `unknown_k_err`:
    the best that one factor on the same hindsight price reaches without knowing k (the floor for a prediction
    made at arrival that got everything right but the long prompts still to come). Empty without long prompts."""
    import numpy as np

    recs = [r for r in run.records if r.ok]
    longs = [(r.arrival, r.first) for r in recs if r.input_len > LONG_PROMPT]
    if not longs:
        return {}
    on = lambda r: r.workers[-1] if r.workers else None  # noqa: E731  (the worker it decoded on)
    ks, ratios = [], []
    for x in replayed:
        r = x.record
        if not r.tpot_ms or r.input_len > LONG_PROMPT:
            continue
        ts = np.linspace(r.first, r.end, samples)
        batch, ctx = np.ones(samples), r.input_len + np.linspace(0, 1, samples) * r.output_len
        for o in recs:
            if o is not r and on(o) == on(r) and o.first < r.end and o.end > r.first:
                m = (ts >= o.first) & (ts < o.end)
                batch[m] += 1
                ctx[m] += o.input_len + (ts[m] - o.first) / max(o.end - o.first, 1e-9) * o.output_len
        price = float(np.mean([float(cm.decode_ms(b, c)) for b, c in zip(batch, ctx)]))
        ks.append(min(3, sum(1 for a, f in longs if f > r.first and a < r.end)))
        ratios.append(r.tpot_ms / price)
    if not ratios:
        return {}
    ks, ratios = np.array(ks), np.array(ratios)
    known = np.concatenate([np.abs(np.median(ratios[ks == k]) / ratios[ks == k] - 1) for k in set(ks.tolist())])
    factors = np.exp(np.linspace(-0.5, 1.0, 601))
    unknown = min(float(np.median(np.abs(c / ratios - 1))) for c in factors)
    return dict(measured_over_hindsight_by_long_prefills={
        str(k): dict(requests=int((ks == k).sum()), median=float(np.median(ratios[ks == k])))
        for k in sorted(set(ks.tolist()))}, known_k_err=float(np.median(known)), unknown_k_err=unknown)


def _median(values: list[float]) -> float | None:
    """The median; None for none (the long prompts' measured / raw predicted TPOT: the backlog's check)."""
    import numpy as np

    return float(np.median(values)) if values else None


def _max(values) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _shares(sweeps: list[dict]) -> list[float]:
    """The least used path's share of each adaptive bin below its sweep's knee."""
    return [min(r["routing_mix"].get(p, 0.0) for p in ("collocated", "disaggregated"))
            for s in sweeps if s["knee"] is not None for r in s["rows"]
            if r["rate"] <= s["knee"] and r.get("bin", True) and r["mode"] == "adaptive" and r["routing_mix"]]


def summarize(sweeps: list[dict], device: str, bimodal_bursty: str | None, online: set[str] | None = None) -> dict:
    """Maxima over the bins below each sweep's knee (rates of a mode with >= MIN_BIN_REQUESTS measured requests;
    fewer: reported apart, `short_rows_below_knee`), those bins whose replayed predictions fall under the measurement
    less or more often than BELOW_BAND; the bimodal bursty sweep's highest rates (acceptance 3). online: the folders
    of the issue's own runs (acceptance 2's and 3's); min_path_share is theirs, the other folders' (the replay set,
    run before the router explored its paths) apart."""
    rows = [r for s in sweeps if s["knee"] is not None for r in s["rows"] if r["rate"] <= s["knee"]]
    below = [r for r in rows if r.get("bin", True)]
    mine = (lambda s: s["folder"].rstrip("/") in online) if online else (lambda s: True)  # noqa: E731
    shares = _shares([s for s in sweeps if mine(s)])
    others = _shares([s for s in sweeps if not mine(s)])
    out = dict(device=device,
               replay_ttft_err_max=_max(r["replay_ttft_err"] for r in below),
               replay_tpot_err_max=_max(r["replay_tpot_err"] for r in below),
               online_ttft_err_max=_max(r["online_ttft_err"] for r in below),
               online_tpot_err_max=_max(r["online_tpot_err"] for r in below),
               min_path_share=min(shares) if shares else None,
               min_path_share_replay_set=min(others) if others else None, bins_below_knee=len(below),
               short_rows_below_knee=len(rows) - len(below),
               short_rows_ttft_err_max=_max(r["replay_ttft_err"] for r in rows if not r.get("bin", True)),
               short_rows_tpot_err_max=_max(r["replay_tpot_err"] for r in rows if not r.get("bin", True)),
               replay_below_outside_band=[
                   dict(folder=s["folder"], mode=r["mode"], rate=r["rate"], metric=k, below=r[f"replay_{k}_below"])
                   for s in sweeps if s["knee"] is not None for r in s["rows"]
                   if r["rate"] <= s["knee"] and r.get("bin", True) for k in ("ttft", "tpot")
                   if r.get(f"replay_{k}_below") is not None and not BELOW_BAND[0] <= r[f"replay_{k}_below"] <= BELOW_BAND[1]])
    bursty = next((s for s in sweeps if s["folder"].rstrip("/") == (bimodal_bursty or "").rstrip("/")), None)
    if bursty is not None:
        statics = [bursty["highest_rate"].get(m) for m in STATIC]
        out.update(bimodal_sweep=bursty["folder"], bimodal_adaptive_highest_rate=bursty["highest_rate"].get("adaptive"),
                   bimodal_best_static_highest_rate=_max(statics))
    return out


def folder_profiles(specs: list[str], default: str) -> list[tuple[str, str]]:
    """(folder, the profile its runs ran with) of each FOLDER or FOLDER=PARAMS_DIR argument."""
    return [(folder, params_dir or default) for folder, _, params_dir in (s.partition("=") for s in specs)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 fromfile_prefix_chars="@")  # @FILE: the arguments one a line (a device's sweeps)
    ap.add_argument("folders", nargs="+", help="sweep folders; FOLDER=PARAMS_DIR for one that ran with another profile")
    ap.add_argument("--device", required=True, help="its name in the output file, e.g. nvidia-h200")
    ap.add_argument("--params-dir", required=True, help="the profile the runs ran with (where FOLDER names none)")
    ap.add_argument("--bimodal-bursty", default=None, help="the folder of acceptance 3's sweep")
    ap.add_argument("--versus-static", nargs="*", default=[], metavar="FOLDER",
                    help="acceptance 2's sweeps (of the folders; one per workload and seed): adaptive against the "
                         "best static mode, per workload, averaged over the seeds")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    from pdcli.router.fit import load_cost_model

    models: dict[str, object] = {}
    sweeps = []
    for folder, params_dir in folder_profiles(args.folders, args.params_dir):
        if params_dir not in models:
            models[params_dir] = load_cost_model(params_dir)
        sweeps.append(dict(sweep(folder, models[params_dir]), params_dir=params_dir))
    online = {f.rstrip("/") for f in args.versus_static + ([args.bimodal_bursty] if args.bimodal_bursty else [])}
    summary = summarize(sweeps, args.device, args.bimodal_bursty, online or None)
    if args.versus_static:
        from pdcli.benchmarks.versus_static import versus_static

        chosen = {f.rstrip("/") for f in args.versus_static}
        summary["versus_static"] = versus_static([s for s in sweeps if s["folder"].rstrip("/") in chosen])
    path = write(args.out, f"router_{args.device}", dict(summary=summary, params_dir=args.params_dir, sweeps=sweeps,
                                                          provenance=provenance("pdcli.benchmarks.router_summary", argv)))
    print(f"-> {path}")
    for s in sweeps:
        print(f"{s['folder']}: knee {s['knee']}, highest rate per mode {s['highest_rate']}")
    print(summary)


if __name__ == "__main__":
    main(sys.argv[1:])
