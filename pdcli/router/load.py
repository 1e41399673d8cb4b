"""The router's view of the workers' load, built from the coordinator's own bookkeeping at each decision."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields

from pdcli.router.cost_model import SHARED_CONTEXT_READ


def shared_discount(cached: int, read: float) -> int:
    """Context tokens a decoding sequence whose first `cached` prompt tokens were prefix-cache hits on the worker
    that decodes it counts less than its whole context: those blocks are shared in the batch, a step is priced for
    `read` of them (CostModel.shared_context_read)."""
    return int((1.0 - read) * cached)


@dataclass
class WorkerLoad:
    queued_prefill_tokens: int = 0  # prompt tokens admitted but not yet prefilled
    queued_prefill_sq_tokens: int = 0  # the sum of those prompts' squared lengths (attention within each)
    decode_batch: int = 0  # sequences decoding
    decode_ctx: int = 0  # their context tokens in all, less decode_shared_ctx (what a step is priced for)
    decode_shared_ctx: int = 0  # taken off decode_ctx for the prefix-cache hits the sequences share (shared_discount)
    inflight_transfers: int = 0
    incoming_decodes: int = 0  # requests routed to decode here whose prompts another worker still prefills
    sharing: int = 0  # other workers with work on the same GPU: time-sliced, each runs at 1 / (1 + sharing)
    sharing_avg: float = 0.0  # the same over time: the others' average busy fractions (prices a whole decode)
    # the other workers on its GPU, summed: queued prompt tokens, sequences decoding, their context tokens, and
    # how many of them decode (each runs its own steps; 0 in records made before it: taken as one)
    neighbour_queued_tokens: int = 0
    neighbour_decode_batch: int = 0
    neighbour_decode_ctx: int = 0
    neighbour_decoders: int = 0
    # since the step began that a neighbour with prompts queued runs (the longest of them; None: none such): how
    # far into its queued prefill it is
    neighbour_since_step_ms: float | None = None
    role: str = "collocated"  # collocated | prefill | decode
    since_step_ms: float | None = None  # since the step it runs began (mark_step; None: none seen, nothing held)
    steps_seen: bool = True  # False: when its steps end is not known (a replay of an older run)
    async_steps: bool = True  # it schedules step i + 2 when step i lands (async scheduling)
    queued_since_step_tokens: int = 0  # of queued_prefill_tokens, those that came after that step began
    device: str = "cpu"
    # the forecast (LoadForecast): what is being routed to it, per second, averaged over the last ~10 s
    prefill_per_s: float = 0.0  # prompts to prefill here
    prefill_tokens_per_s: float = 0.0  # their tokens
    prefill_sq_tokens_per_s: float = 0.0  # the sum of their squared lengths (attention within a prompt)
    gpu_prefill_per_s: float | None = None  # the same summed over the workers on its GPU (None: its own)
    gpu_prefill_tokens_per_s: float | None = None
    gpu_prefill_sq_tokens_per_s: float | None = None
    decode_per_s: float = 0.0  # requests to decode here
    mean_output_len: float = 0.0  # their expected output length


def compact(w: WorkerLoad) -> dict:
    """The fields of w that differ from their defaults, floats to 4 significant digits: what a decision
    records (`bench --save-detailed`) for replays (WorkerLoad(**compact(w)) restores it)."""
    out = {}
    for f in fields(WorkerLoad):
        v = getattr(w, f.name)
        if v != f.default:
            out[f.name] = float(f"{v:.4g}") if isinstance(v, float) else v
    return out


def committed_batch(w: WorkerLoad) -> int:
    """The sequences w decodes now and those already on their way to it (handed off or still prefilling elsewhere):
    the batch a request routed to it now will decode in (routing on the decode batch alone sends many to one
    worker before the first of them arrives)."""
    return w.decode_batch + w.inflight_transfers + w.incoming_decodes


def busy(w: WorkerLoad) -> bool:
    """Decoding: what slows a decode batch of another worker on the GPU beyond the prefill share."""
    return w.decode_batch > 0


def mark_gpu_sharing(loads: dict[int, WorkerLoad], devices: dict[int, str],
                     busy_avg: dict[int, float] | None = None) -> None:
    """Set each worker's `sharing`: how many other workers on its GPU decode now (two decode batches on one
    GPU each read all the weights: measured on one H100 under MPS, a step beside another took ~2x), and
    `sharing_avg`: the same from each one's average decoding fraction (busy_avg, e.g. sampled at Poisson
    arrivals, which see time averages), the slowdown over a decode that lasts many steps. Prefill work on the
    GPU is counted apart, as a share of its time (router/latency.py)."""
    now = {r for r, w in loads.items() if busy(w)}
    for r, w in loads.items():
        others = gpu_neighbours(loads, devices, r)
        w.sharing = sum(1 for o in others if o in now)
        w.sharing_avg = w.sharing if busy_avg is None else sum(busy_avg.get(o, 0.0) for o in others)
    mark_gpu_neighbours(loads, devices)


def gpu_neighbours(loads: dict[int, WorkerLoad], devices: dict[int, str], rank: int) -> list[int]:
    dev = devices.get(rank, "cpu")
    return [] if dev == "cpu" else [o for o in loads if o != rank and devices.get(o) == dev]


def mark_gpu_neighbours(loads: dict[int, WorkerLoad], devices: dict[int, str]) -> None:
    """Set each worker's neighbour_* fields from the loads of the other workers on its GPU: what their steps
    hold now, which slows its own (latency.neighbour_ms)."""
    for r, w in loads.items():
        others = [loads[o] for o in gpu_neighbours(loads, devices, r)]
        w.neighbour_queued_tokens = sum(o.queued_prefill_tokens for o in others)
        w.neighbour_decode_batch = sum(o.decode_batch for o in others)
        w.neighbour_decode_ctx = sum(o.decode_ctx for o in others)
        w.neighbour_decoders = sum(1 for o in others if o.decode_batch > 0)
        since = [o.since_step_ms for o in others if o.queued_prefill_tokens > 0 and o.since_step_ms is not None]
        w.neighbour_since_step_ms = max(since) if since else None


def mark_step(w: WorkerLoad, last_step_end: float | None, pending: list[tuple[float, int]], now: float) -> None:
    """Set w's since_step_ms (since the step it runs began: running_step_start) and queued_since_step_tokens (the
    prompt tokens that came after, in no step it has scheduled). pending: (arrival, tokens left) of the prompts it
    holds unprefilled; times in s on the clock of now."""
    start = running_step_start(last_step_end, [a for a, _ in pending], w.decode_batch > 0)
    w.since_step_ms = None if start is None else (now - start) * 1e3
    w.queued_since_step_tokens = sum(n for a, n in pending if start is None or a > start)


def running_step_start(last_step_end: float | None, pending: list[float], decoding: bool) -> float | None:
    """When the step a worker runs now began (s, the caller's clock): when its last step ended, while it held work
    then (a prompt that came before, or sequences decoding); a worker idle then began one when the first of the
    prompts it holds came (None: no step seen and nothing held). pending: the arrivals of the prompts it holds
    unprefilled."""
    first = min(pending, default=None)
    if last_step_end is not None and (decoding or (first is not None and first <= last_step_end)):
        return last_step_end
    return last_step_end if first is None else first


BUSY_EMA = 0.1  # weight of the newest sample of a worker's busy fraction (~ the last 10 decisions)


class LoadView:
    """Per-rank load from the requests the coordinator tracks; each snapshot also samples every worker's
    busy fraction (an exponential average: Poisson arrivals see time averages). shared_read: the share of a
    decoding sequence's shared prefix-cache hit its worker's context counts (CostModel.shared_context_read)."""

    def __init__(self, shared_read: float = SHARED_CONTEXT_READ):
        self.shared_read = shared_read
        self.busy_avg: dict[int, float] = {}  # rank -> average busy fraction, for the GPU-sharing slowdown
        self.forecast = LoadForecast()

    def routed(self, prefill_rank: int, decode_rank: int, prompt_len: int, out_len: float) -> None:
        """A request has been routed (by any policy): the forecast counts it (prompt_len: the tokens its prefilling
        worker computes, the cached prefix left out)."""
        self.forecast.route(time.perf_counter(), prefill_rank, decode_rank, prompt_len, out_len)

    def snapshot(self, workers, requests) -> dict[int, WorkerLoad]:
        """workers: the coordinator's handles (spec, alive, last_step_end), by rank; requests: those not done."""
        now = time.perf_counter()
        loads = {w.spec.rank: WorkerLoad(role=w.spec.role, async_steps=w.spec.role != "prefill", device=w.spec.place)
                 for w in workers}
        pending: dict[int, list[tuple[float, int]]] = {r: [] for r in loads}  # (arrival, prompt tokens left)
        for t in requests:
            if t.path:
                self._add(loads, pending, t)
        for w in workers:
            mark_step(loads[w.spec.rank], w.last_step_end, pending[w.spec.rank], now)
        for r, w in loads.items():
            self.busy_avg[r] = (1 - BUSY_EMA) * self.busy_avg.get(r, 0.0) + BUSY_EMA * busy(w)
        mark_gpu_sharing(loads, {w.spec.rank: w.spec.place for w in workers if w.alive}, self.busy_avg)
        self.forecast.apply(loads, now)
        return loads

    def _add(self, loads: dict[int, WorkerLoad], pending: dict[int, list], t) -> None:
        generated = t.num_generated
        if t.stage == "prefill" and t.decode_rank is not None and t.decode_rank != t.prefill_rank:
            loads[t.decode_rank].incoming_decodes += 1
        if t.stage in ("collocated", "prefill") and generated == 0:
            w = loads[t.prefill_rank]
            n, done = len(t.prompt_ids), min(t.prefilled, len(t.prompt_ids) - 1)  # what its steps have left
            w.queued_prefill_tokens += n - done
            w.queued_prefill_sq_tokens += n ** 2 - done ** 2  # its attention pairs left, x 2
            pending[t.prefill_rank].append((t.arrival, n - done))
        elif t.stage == "collocated":  # its cached prefix in blocks shared with the sequences that computed it
            w, shared = loads[t.prefill_rank], shared_discount(t.cached_tokens, self.shared_read)
            w.decode_batch += 1
            w.decode_ctx += len(t.prompt_ids) + generated - shared
            w.decode_shared_ctx += shared
        elif t.stage == "handoff":
            loads[t.decode_rank].inflight_transfers += 1
        elif t.stage == "decode":
            loads[t.decode_rank].decode_batch += 1
            loads[t.decode_rank].decode_ctx += len(t.prompt_ids) + generated


FORECAST_TAU_S = 10.0  # s: the time constant of the load forecast's averages


class EventRate:
    """Events per second (weighted by their size), exponentially averaged over tau; corrected for the
    averaging window still being shorter than tau early in a run."""

    def __init__(self, tau: float = FORECAST_TAU_S):
        self.tau, self.level, self.t, self.t0 = tau, 0.0, None, None

    def add(self, t: float, size: float = 1.0) -> None:
        if self.t0 is None:  # the first event opens the window: the rate is of the events after it
            self.t0 = self.t = t
            return
        self.level = self._decayed(t) + size
        self.t = t

    def _decayed(self, t: float) -> float:
        return 0.0 if self.t is None else self.level * math.exp(-max(0.0, t - self.t) / self.tau)

    def at(self, t: float) -> float:
        if self.t0 is None:
            return 0.0
        window = self.tau * (1 - math.exp(-max(t - self.t0, 1e-3) / self.tau))  # effective averaging span, s
        return self._decayed(t) / max(window, 1e-3)


class LoadForecast:
    """What is coming to each worker: the prompt tokens routed to it for prefill and the requests routed to it
    for decode (per second, exponentially averaged), with the expected output length of the latter."""

    def __init__(self, tau: float = FORECAST_TAU_S):
        self.tau = tau
        self.prefill: dict[int, EventRate] = {}
        self.prompts: dict[int, EventRate] = {}
        self.prefill_sq: dict[int, EventRate] = {}
        self.decode: dict[int, EventRate] = {}
        self.out_tokens: dict[int, EventRate] = {}

    def _rate(self, table: dict, rank: int) -> EventRate:
        return table.setdefault(rank, EventRate(self.tau))

    def route(self, t: float, prefill_rank: int, decode_rank: int, prompt_len: int, out_len: float) -> None:
        """A request routed at t (perf_counter or run seconds): prefilled on one worker, decoded on the same
        or another."""
        self._rate(self.prefill, prefill_rank).add(t, prompt_len)
        self._rate(self.prompts, prefill_rank).add(t)
        self._rate(self.prefill_sq, prefill_rank).add(t, float(prompt_len) ** 2)
        self._rate(self.decode, decode_rank).add(t)
        self._rate(self.out_tokens, decode_rank).add(t, out_len)

    def apply(self, loads: dict[int, WorkerLoad], t: float) -> None:
        """Fill each worker's forecast fields as of t."""
        for rank, w in loads.items():
            w.prefill_tokens_per_s = self._rate(self.prefill, rank).at(t)
            w.prefill_per_s = self._rate(self.prompts, rank).at(t)
            w.prefill_sq_tokens_per_s = self._rate(self.prefill_sq, rank).at(t)
            w.decode_per_s = self._rate(self.decode, rank).at(t)
            out = self._rate(self.out_tokens, rank).at(t)
            w.mean_output_len = out / w.decode_per_s if w.decode_per_s > 0 else 0.0
        for w in loads.values():
            gpu = [o for o in loads.values() if o is w or (w.device != "cpu" and o.device == w.device)]
            w.gpu_prefill_per_s = sum(o.prefill_per_s for o in gpu)
            w.gpu_prefill_tokens_per_s = sum(o.prefill_tokens_per_s for o in gpu)
            w.gpu_prefill_sq_tokens_per_s = sum(o.prefill_sq_tokens_per_s for o in gpu)
