"""Replay of saved `pdcli bench --save-detailed` runs: every request's decision re-predicted from the state
the router saw when it arrived, against what the request measured.

A run records, per request (the record format, shared with `pdcli plan --validate`): `arrival` (s from the
run's start), `input_len`, `output_len`, `ttft_ms`, `e2el_ms`, `error`, `path`, `workers` (the ranks that ran
it: the collocated worker, or the prefill then the decode worker), and from the router, `decision` with
`loads` (each worker's `WorkerLoad` at that moment) and both paths' predictions; and where a first token's time
went (s from the run's start, one host's clock; `pdcli.benchmarks.ttft_parts`): `submitted` and `dispatched` (the
coordinator took it, sent its prompt on), `received`, `launched`, `landed` (its prefill worker took it, launched a
step with its first prompt tokens, landed its first token; the last two since 2026-12-05 night). Runs that recorded no loads
(or no workers) are rebuilt from the records themselves: a request is queued on its prefill worker from its
arrival to its first token and decodes on its decode worker from its first token to its end; workers are
assigned as the coordinator did (fewest requests in flight, ties in turn; in an adaptive run as its router did);
the load forecast sees the same arrivals in the same order. When a worker's last step ended, which the live
router has from the workers' step reports, is rebuilt from the steps the records mark: a step that finished
prompts ends with their first tokens, one that finished requests with their last (step_ends); a prefill worker's
steps all finish prompts, a collocated or decode worker's steps in between are taken as back to back at the cost
model's step. In the simulator, where the
cost model is exact, not knowing when the last step ended took the router's median TTFT error on a collocated
worker from 0-2% to 14-22% (1024-token prompts, 8-24 req/s, one H100's profile).
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field, replace

from pdcli.bench import result_files
from pdcli.router.cost_model import SHARED_CONTEXT_READ
from pdcli.router.load import (LoadForecast, WorkerLoad, mark_gpu_neighbours, mark_gpu_sharing, mark_step,
                               shared_discount)

logger = logging.getLogger("pdcli.replay")

STEP_CLUSTER_S = 0.002  # s: first or last tokens on one worker this close came from one step


@dataclass
class Record:
    arrival: float  # s from the run's start
    input_len: int
    output_len: int
    ttft_ms: float | None
    e2el_ms: float | None
    path: str
    workers: tuple[int, ...] = ()
    loads: dict[int, WorkerLoad] | None = None  # as recorded with the decision
    error: str | None = None
    cached: dict = field(default_factory=dict)  # path -> prompt tokens the prefilling worker held (recorded)

    @property
    def ok(self) -> bool:
        return self.error is None and self.ttft_ms is not None and self.e2el_ms is not None

    @property
    def first(self) -> float:
        return self.arrival + self.ttft_ms / 1e3

    @property
    def end(self) -> float:
        return self.arrival + self.e2el_ms / 1e3

    @property
    def tpot_ms(self) -> float | None:
        return (self.e2el_ms - self.ttft_ms) / (self.output_len - 1) if self.ok and self.output_len > 1 else None


@dataclass
class Run:
    file: str
    mode: str
    rate: float
    layout: list[dict]  # rank, role, device
    pd_on_collocated: bool
    records: list[Record] = field(default_factory=list)
    slo: dict = field(default_factory=dict)  # goodput_slos: ttft / tpot ms
    step_ends: dict | None = None  # rank -> when its steps are known to have ended (s), rebuilt (step_ends)
    max_concurrency: int | None = None  # a closed loop rebuilt without its records (plan.validate): sent as slots free
    time_sliced: bool = False  # workers shared a GPU without MPS (bench --no-mps): their kernels never overlapped


def time_sliced(d: dict) -> bool:
    """Whether a bench result's workers shared a GPU without MPS (`--no-mps`)."""
    devices = [w["device"] for w in d.get("layout") or [] if w["device"] != "cpu"]
    return len(set(devices)) < len(devices) and d.get("mps") is False


def _record(q: dict) -> Record:
    decision = q.get("decision") if isinstance(q.get("decision"), dict) else {}
    loads = decision.get("loads")
    return Record(q["arrival"], q["input_len"], q["output_len"], q.get("ttft_ms"), q.get("e2el_ms"), q.get("path", ""),
                  tuple(q.get("workers") or ()), {int(r): WorkerLoad(**w) for r, w in loads.items()} if loads else None,
                  q.get("error"), decision.get("cached_tokens") or {})


def load_runs(folder: str) -> list[Run]:
    """Every finished bench result with per-request records in folder (an interrupted run's records are a cut
    sample: left out, as `--resume` reruns it), by mode then rate."""
    runs = [run for path, d in read_results(folder) if (run := recorded_run(path, d)) is not None]
    return sorted(runs, key=lambda r: (r.mode, r.rate))


def read_results(folder: str):
    """(path, content) of each readable result file in folder."""
    for path in result_files.find(folder):
        try:
            yield path, result_files.read(path)
        except (ValueError, EOFError, OSError):  # not a result (e.g. a replay being written into the folder by a shell redirect)
            logger.warning("%s is not JSON: skipped", path)


def recorded_run(path: str, d) -> Run | None:
    """A finished bench result with per-request records as a Run, else None."""
    if not isinstance(d, dict) or not d.get("requests") or "layout" not in d or d.get("interrupted"):
        return None
    rate = float("inf") if d["request_rate"] == "inf" else float(d["request_rate"])
    return Run(path, d["mode"], rate, d["layout"], bool(d.get("pd_on_collocated")),
               sorted((_record(q) for q in d["requests"]), key=lambda r: r.arrival), d.get("goodput_slos") or {},
               time_sliced=time_sliced(d))


def simulated_run(specs, mode: str, rate: float, recs, slo: dict, loads: list | None = None) -> Run:
    """A run of the planner's simulator (its RequestRecords, on workers specs) in the replay's record format;
    loads: the WorkerLoads each request met, by index (else rebuilt as for an older run)."""
    return Run("simulated", mode, rate, [dict(rank=s.rank, role=s.role, device=s.device) for s in specs], False,
               [Record(r.arrival, r.input_len, r.output_len, r.ttft_ms if r.ok else None, r.e2el_ms if r.ok else None,
                       r.path, r.workers, loads[i] if loads else None) for i, r in enumerate(recs)], slo)


def _can_hand_off(p: dict, d: dict, pd_on_collocated: bool) -> bool:
    if p["rank"] == d["rank"]:
        return False
    if p["role"] == "prefill" and d["role"] == "decode":
        return True
    return pd_on_collocated and p["role"] in ("prefill", "collocated") and d["role"] in ("decode", "collocated") \
        and (p["device"] != d["device"] or p["device"] == "cpu")


def _router_load(run: Run, i: int) -> dict[int, int]:
    """Per worker when record i arrived, the adaptive router's order of the workers in the code the older runs ran
    (commit 4bdce97): prompt tokens queued there plus sequences decoding there."""
    t, load = run.records[i].arrival, {w["rank"]: 0 for w in run.layout}
    for o in run.records[:i]:
        if o.ok and o.workers:
            if o.first > t:
                load[o.workers[0]] += o.input_len
            elif o.end > t:
                load[o.workers[-1]] += 1
    return load


def assign_workers(run: Run) -> None:
    """Give each record that has none the workers the coordinator would have chosen: the collocated worker or
    P/D pair with the fewest requests in flight (a request holds its prefill worker until its first token and
    its decode worker until its end), ties taken in turn; in an adaptive run, as its router chose them, the least
    loaded by _router_load (replayed TTFT error of the 2x H100 adaptive run at its knee, 48 req/s: 13.4%, 20.5% with
    the fewest in flight; DistServe's 2x H100 at 75 / 100 req/s: 13.2 / 19.9%, 17.3 / 27.0%)."""
    colls = [w["rank"] for w in run.layout if w["role"] == "collocated"]
    pairs = [(p["rank"], d["rank"]) for p in run.layout for d in run.layout if _can_hand_off(p, d, run.pd_on_collocated)]
    held: dict[int, list[float]] = {w["rank"]: [] for w in run.layout}  # rank -> when each held request leaves
    turn = 0
    for i, r in enumerate(run.records):
        if not r.workers:
            inflight = _router_load(run, i) if run.mode == "adaptive" else \
                {k: sum(1 for t in v if t > r.arrival) for k, v in held.items()}
            if r.path == "disaggregated" and pairs:
                best = min((inflight[p], inflight[d]) for p, d in pairs)
                tied = [pd for pd in pairs if (inflight[pd[0]], inflight[pd[1]]) == best]
                r.workers, turn = tied[turn % len(tied)], turn + 1
            elif colls:
                r.workers = (min(colls, key=lambda k: inflight[k]),)
        if r.ok and r.workers:
            held[r.workers[0]].append(r.first if len(r.workers) > 1 else r.end)
            if len(r.workers) > 1:
                held[r.workers[1]].append(r.end)


def _unprefilled(cm, r: Record, t: float) -> int:
    """The prompt tokens of record r its worker had not reported computed at t (< its first token): its chunks
    ran back to back, a full chunk per full step, the last ending at its first token; a worker reports a chunk
    when its step lands (StepTokens.prefilled), so whole chunks only."""
    budget = cm.max_num_batched_tokens
    left = (r.first - t) * 1e3 / float(cm.prefill_ms(budget)) * budget  # tokens, at a full chunk's pace
    done = max(0, r.input_len - int(left)) // budget * budget
    return r.input_len - min(done, r.input_len - 1)


def step_ends(run: Run) -> dict[int, list[float]]:
    """Per worker, when steps are known to have ended: the first tokens of the prompts it prefilled and (but on a
    prefill worker) the last tokens of the requests it decoded; marks within STEP_CLUSTER_S of each other are
    one step (the earliest of them). A prefill worker's steps all end with first tokens: its list is whole."""
    if run.step_ends is None:
        run.step_ends = {}
        for w in run.layout:
            rank = w["rank"]
            marks = sorted([r.first for r in run.records if r.ok and r.workers and r.workers[0] == rank] +
                           ([r.end for r in run.records if r.ok and r.workers and r.workers[-1] == rank
                             and r.output_len > 1] if w["role"] != "prefill" else []))
            ends = []
            for t in marks:
                if not ends or t - last > STEP_CLUSTER_S:
                    ends.append(t)
                last = t
            run.step_ends[rank] = ends
    return run.step_ends


def rebuilt_loads(run: Run, i: int, forecast: LoadForecast, cm=None) -> dict[int, WorkerLoad]:
    """The workers' loads when record i arrived, from the records before it (with cm: a prompt still prefilling
    counts only the chunks it has left, as its worker would have reported them: _unprefilled; and when its last
    step ended: the last known step end (step_ends), on a worker that steps on without marks (async) folded by
    the cost model's step at its load, as if its steps since had run back to back)."""
    t = run.records[i].arrival
    loads = {w["rank"]: WorkerLoad(role=w["role"], async_steps=w["role"] != "prefill", device=w["device"], steps_seen=False)
             for w in run.layout}
    queued: dict[int, list[tuple[float, int]]] = {rank: [] for rank in loads}  # (arrival, tokens left)
    for r in run.records[:i]:
        if not r.ok or not r.workers:
            continue
        if r.first > t:
            left = _unprefilled(cm, r, t) if cm is not None else r.input_len
            loads[r.workers[0]].queued_prefill_tokens += left
            loads[r.workers[0]].queued_prefill_sq_tokens += r.input_len ** 2 - (r.input_len - left) ** 2
            queued[r.workers[0]].append((r.arrival, left))
        elif r.end > t:
            w = loads[r.workers[-1]]
            made = 1 + (t - r.first) * 1e3 / r.tpot_ms if r.tpot_ms else 1
            shared = shared_discount(r.cached.get("collocated", 0), cm.shared_context_read if cm is not None
                                     else SHARED_CONTEXT_READ) if r.path == "collocated" else 0
            w.decode_batch += 1
            w.decode_ctx += r.input_len + int(min(made, r.output_len)) - shared
            w.decode_shared_ctx += shared
    for rank, w in loads.items():
        ends = step_ends(run).get(rank, []) if cm is not None else []
        k = bisect.bisect_right(ends, t)
        if not k:
            w.queued_since_step_tokens = w.queued_prefill_tokens
            continue
        last = ends[k - 1]
        if w.async_steps and (w.decode_batch or w.queued_prefill_tokens):  # steps since: back to back
            chunk = min(w.queued_prefill_tokens, max(1, cm.max_num_batched_tokens - w.decode_batch))
            step = cm.step_ms(w.decode_batch, w.decode_ctx, [(chunk, 0)] if chunk else []) / 1e3
            last = t - (t - last) % step if step > 0 else last
        w.steps_seen = True
        mark_step(w, last, queued[rank], t)
    mark_gpu_sharing(loads, {w["rank"]: w["device"] for w in run.layout})
    forecast.apply(loads, t)
    return loads


@dataclass
class Replayed:
    record: Record
    raw: dict  # the cost model's prediction for the path taken: ttft_ms, tpot_ms, ...
    predicted: dict  # the same after the calibration


def _transfer_pair(run: Run, workers: tuple[int, ...]) -> str:
    dev = {w["rank"]: w["device"] for w in run.layout}
    p, d = dev[workers[0]], dev[workers[-1]]
    return "cpu-gloo" if "cpu" in (p, d) else ("gpu-ipc" if p == d else "gpu-nccl")


def replay_run(run: Run, router) -> list[Replayed]:
    """Re-predict every request of a run with `router` (an AdaptiveRouter), in arrival order; the router's
    output-length predictor and calibration learn from the requests that finished before each arrival."""
    assign_workers(run)
    shared = _shared_decoding(run, router.cm.shared_context_read)
    clock = [0.0]
    router.calibration.clock = lambda: clock[0]  # the run's own time
    forecast, out, done = LoadForecast(), [], []
    ends = sorted((r for r in run.records if r.ok), key=lambda r: r.end)
    for i, r in enumerate(run.records):
        while ends and ends[0].end <= r.arrival:
            clock[0] = ends[0].end
            _observe(router, ends.pop(0), done)
        clock[0] = r.arrival
        if not r.ok or not r.workers:
            continue
        loads = r.loads or rebuilt_loads(run, i, forecast, router.cm)
        if r.loads and shared is not None:
            loads = _with_shared(loads, shared, r.arrival)
        if r.loads:  # runs recorded before the neighbour fields
            mark_gpu_neighbours(loads, {w["rank"]: w["device"] for w in run.layout})
        out_len = router.predictor.mean(r.input_len, r.output_len)
        path = r.path if r.path == "disaggregated" else "collocated"
        raw, pred, roles = router.price(path, r.input_len, out_len, loads[r.workers[0]], loads[r.workers[-1]],
                                        _transfer_pair(run, r.workers), r.cached.get(path, 0))
        out.append(Replayed(r, raw, pred))
        done.append((r, roles, raw))
        forecast.route(r.arrival, r.workers[0], r.workers[-1], r.input_len - r.cached.get(path, 0), out_len)
    return out


def _shared_decoding(run: Run, read: float):
    """For a run recorded before the loads counted shared prefix-cache hits (load.shared_discount, at `read`) that
    has such hits: (first token, end, worker, discount) of each collocated request that had one, as arrays; else
    None."""
    import numpy as np

    hits = [r for r in run.records if r.ok and r.workers and r.path == "collocated" and r.cached.get("collocated")]
    if not hits or any(w.decode_shared_ctx for r in run.records if r.loads for w in r.loads.values()):
        return None
    return (np.array([r.first for r in hits]), np.array([r.end for r in hits]),
            np.array([r.workers[0] for r in hits]), np.array([shared_discount(r.cached["collocated"], read)
                                                              for r in hits]))


def _with_shared(loads: dict[int, WorkerLoad], shared, t: float) -> dict[int, WorkerLoad]:
    """Copies of recorded loads with the shared hits of the requests decoding at t taken off their context."""
    first, end, rank, disc = shared
    decoding = (first <= t) & (end > t)
    out = {}
    for k, w in loads.items():
        n = int(disc[decoding & (rank == k)].sum())
        out[k] = replace(w, decode_ctx=max(0, w.decode_ctx - n), decode_shared_ctx=n) if n else w
    return out


def _observe(router, rec: Record, done: list) -> None:
    """A finished request teaches the router its output length and, if replayed, its measured latencies."""
    entry = next((e for e in done if e[0] is rec), None)
    measured = dict(ttft_ms=rec.ttft_ms) | (dict(tpot_ms=rec.tpot_ms) if rec.tpot_ms else {})
    router.observe(rec.input_len, rec.output_len, entry[1] if entry else None, entry[2] if entry else None, measured)


def errors(replayed: list[Replayed], key: str = "predicted") -> dict:
    """Median |relative error| of TTFT and TPOT and the share of predictions below the measurement."""
    import numpy as np

    res = dict(num_requests=len(replayed))
    for metric, measure in (("ttft", lambda r: r.ttft_ms), ("tpot", lambda r: r.tpot_ms)):
        pairs = [(getattr(x, key)[f"{metric}_ms"], measure(x.record)) for x in replayed if measure(x.record)]
        if not pairs:
            continue
        p, m = np.array(pairs, float).T
        res[f"{metric}_err"] = float(np.median(np.abs(p - m) / m))
        res[f"{metric}_below"] = float(np.mean(p < m))
    return res


def run_router(run: Run, cm, **kwargs):
    """A fresh adaptive router with the run's SLOs, to replay it (kwargs: AdaptiveRouter's others)."""
    from pdcli.router.adaptive import AdaptiveRouter

    return AdaptiveRouter(cm, run.slo.get("ttft"), run.slo.get("tpot"),
                          slo_ttft_per_token_ms=run.slo.get("ttft_per_token", 0.0), **kwargs)


def replay_table(runs: list[Run], cm) -> list[dict]:
    """One row per (mode, rate, path): the calibrated router's errors, each run replayed by a fresh router."""
    rows = []
    for run in runs:
        replayed = replay_run(run, run_router(run, cm))
        state = "recorded" if any(r.loads for r in run.records) else "rebuilt"
        for path in sorted({x.record.path for x in replayed}):
            rows.append(dict(mode=run.mode, rate=run.rate, path=path, state=state,
                             **errors([x for x in replayed if x.record.path == path])))
    return rows
