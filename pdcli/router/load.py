"""The router's view of the workers' load, built from the coordinator's own bookkeeping at each decision."""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class WorkerLoad:
    queued_prefill_tokens: int = 0  # prompt tokens admitted but not yet prefilled
    decode_batch: int = 0  # sequences decoding
    decode_ctx: int = 0  # their context tokens in all
    inflight_transfers: int = 0
    sharing: int = 0  # other workers with work on the same GPU: time-sliced, each runs at 1 / (1 + sharing)
    sharing_avg: float = 0.0  # the same over time: the others' average busy fractions (prices a whole decode)
    role: str = "collocated"  # collocated | prefill | decode
    since_step_ms: float | None = None  # since its last step ended (None: no step seen yet)
    async_steps: bool = True  # it schedules step i + 2 when step i lands (async scheduling)
    queued_since_step_tokens: int = 0  # of queued_prefill_tokens, those that came after its last step ended


def busy(w: WorkerLoad) -> bool:
    return bool(w.queued_prefill_tokens or w.decode_batch or w.inflight_transfers)


def mark_gpu_sharing(loads: dict[int, WorkerLoad], devices: dict[int, str],
                     busy_avg: dict[int, float] | None = None) -> None:
    """Set each worker's `sharing`: how many other workers on its GPU have work now (two processes on one
    GPU are time-sliced, not run side by side), and `sharing_avg`: the same from each one's average busy
    fraction (busy_avg, e.g. sampled at Poisson arrivals, which see time averages), the slowdown over a
    decode that lasts many steps rather than at this instant."""
    now = {r for r, w in loads.items() if busy(w)}
    for r, w in loads.items():
        dev = devices.get(r, "cpu")
        others = [] if dev == "cpu" else [o for o in loads if o != r and devices.get(o) == dev]
        w.sharing = sum(1 for o in others if o in now)
        w.sharing_avg = w.sharing if busy_avg is None else sum(busy_avg.get(o, 0.0) for o in others)


BUSY_EMA = 0.1  # weight of the newest sample of a worker's busy fraction (~ the last 10 decisions)


class LoadView:
    """Per-rank load from the requests the coordinator tracks; each snapshot also samples every worker's
    busy fraction (an exponential average: Poisson arrivals see time averages)."""

    def __init__(self):
        self.busy_avg: dict[int, float] = {}  # rank -> average busy fraction, for the GPU-sharing slowdown

    def snapshot(self, workers, requests) -> dict[int, WorkerLoad]:
        """workers: the coordinator's handles (spec, alive, last_step_end), by rank; requests: those not done."""
        now = time.perf_counter()
        loads = {w.spec.rank: WorkerLoad(role=w.spec.role, async_steps=w.spec.role != "prefill",
                                         since_step_ms=None if w.last_step_end is None else (now - w.last_step_end) * 1e3)
                 for w in workers}
        for t in requests:
            if t.path:
                self._add(loads, workers, t)
        for r, w in loads.items():
            self.busy_avg[r] = (1 - BUSY_EMA) * self.busy_avg.get(r, 0.0) + BUSY_EMA * busy(w)
        # also under MPS: measured on one H100 with three workers, a decode step ran ~2x the model's time
        # beside another busy worker (two decode batches each read all the weights), a prefill 2-3x
        mark_gpu_sharing(loads, {w.spec.rank: w.spec.device for w in workers if w.alive}, self.busy_avg)
        return loads

    @staticmethod
    def _add(loads: dict[int, WorkerLoad], workers, t) -> None:
        generated = t.num_generated
        if t.stage in ("collocated", "prefill") and generated == 0:
            w = loads[t.prefill_rank]
            w.queued_prefill_tokens += len(t.prompt_ids)
            last = workers[t.prefill_rank].last_step_end
            if last is None or t.arrival > last:  # not in a step the worker has already scheduled
                w.queued_since_step_tokens += len(t.prompt_ids)
        elif t.stage == "collocated":
            loads[t.prefill_rank].decode_batch += 1
            loads[t.prefill_rank].decode_ctx += len(t.prompt_ids) + generated
        elif t.stage == "handoff":
            loads[t.decode_rank].inflight_transfers += 1
        elif t.stage == "decode":
            loads[t.decode_rank].decode_batch += 1
            loads[t.decode_rank].decode_ctx += len(t.prompt_ids) + generated
