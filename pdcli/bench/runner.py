"""In-process open-loop load: each request is submitted to the coordinator at its scheduled time and
stamped with that time, so queueing delay counts; the run drains until every request has ended."""
from __future__ import annotations

import math
import time

from pdcli.bench.metrics import RequestRecord
from pdcli.bench.workloads import BenchRequest
from pdcli.sampling_params import SamplingParams
from pdcli.workers.layout import WorkerSpec, parse_layout

MODES = ("collocated", "disaggregated", "adaptive", "threshold")


def prompt_seed(seed: int, rate: float) -> int:
    """The prompts' seed of a sweep's run at `rate` (req/s): every rate gets prompts of its own, since a rate run
    on workers that served the one before would find those prompts in their prefix cache (the same prompts at
    every rate made the first requests of each rate cache hits). Keyed by the rate's value, not its place in
    the list, so every mode at a rate gets the same prompts also when a sweep is split or resumed with other
    rate lists (keyed by place until 2026-12-05: a mode run on a shorter list drew another rate's prompts)."""
    return seed + 1_000_003 * (0 if math.isinf(rate) else round(rate * 1000))


def layout_for(mode: str, devices: list[str], num_prefill: int | None = None, tp: int = 1) -> list[WorkerSpec]:
    """The same devices for every mode: all collocated; or split into prefill and decode workers (the first
    num_prefill devices prefill, by default half of them); or (adaptive, threshold) on two or more devices a
    collocated worker on each, which also prefill and decode for each other (`layout.collocated_only`), so
    the router can take either path without two processes sharing a GPU; on one device a collocated and a
    prefill worker, which hands the KV back to it (one decode batch on the GPU: two would each read all the
    weights every step)."""
    if tp > 1:  # each worker spans tp devices: the list becomes one of groups (all CPUs: tp CPU ranks each)
        if len(devices) % tp and any(d != "cpu" for d in devices):
            raise ValueError(f"{len(devices)} devices are not a multiple of --tensor-parallel-size {tp}")
        devices = devices if all(d == "cpu" for d in devices) else \
            ["+".join(devices[i:i + tp]) for i in range(0, len(devices), tp)]
    n = len(devices)
    k = max(1, n // 2) if num_prefill is None else num_prefill
    if n >= 2 and not 1 <= k < n:
        raise ValueError(f"--num-prefill must leave a decode device: 1 to {n - 1} of {n} devices, got {k}")
    if mode == "collocated" or (mode in ("adaptive", "threshold") and n >= 2):
        return parse_layout(",".join(devices), tp=tp)
    if mode == "disaggregated":
        return parse_layout("", ",".join(devices[:k]), ",".join(devices[k:] or devices[:1]), tp=tp)
    return parse_layout(devices[0], devices[0], tp=tp)


PROGRESS_S = 0.25  # the progress line is redrawn at most this often while requests are sent


class LoadInterrupted(Exception):
    """Ctrl-C during a load: the records of the requests sent so far (those still running aborted)."""

    def __init__(self, records: list[RequestRecord]):
        super().__init__("interrupted")
        self.records = records


def run_load(cs, requests: list[BenchRequest], arrivals, mode: str, drain_timeout: float, progress=None,
             task=None, max_concurrency: int | None = None) -> list[RequestRecord]:
    """max_concurrency (vLLM's flag): at most that many requests in flight; a request that waits for a
    slot is timed from when it gets one. Ctrl-C aborts the requests in flight and raises LoadInterrupted."""
    start = time.perf_counter()
    tracked = []  # (arrival, request, Tracked)
    try:
        _send(cs, requests, arrivals, mode, start, tracked, progress, task, max_concurrency)
        _drain(cs, tracked, mode, len(requests), start, drain_timeout, progress, task)
    except KeyboardInterrupt:
        for _, _, t in tracked:
            cs.abort(t.rid, "benchmark interrupted")
        raise LoadInterrupted(_records(tracked, start)) from None
    if progress:
        progress.update(task, completed=len(requests))
    return _records(tracked, start)


def _send(cs, requests, arrivals, mode: str, start: float, tracked: list, progress, task,
          max_concurrency: int | None) -> None:
    """Submit each request at its arrival time (or when a slot frees up), appending to tracked."""
    shown, open_ = start, []
    for req, at in zip(requests, arrivals):
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        arrival = start + at
        if max_concurrency:
            while len(open_) >= max_concurrency:
                open_ = [t for t in open_ if not t.done.is_set()]
                if len(open_) >= max_concurrency:
                    time.sleep(0.0005)
            arrival = max(arrival, time.perf_counter())
        p = SamplingParams(temperature=0, max_tokens=req.output_len, ignore_eos=True)
        t = cs.submit(req.prompt_ids, p, mode)
        tracked.append((arrival, req, t))
        open_.append(t)
        if progress and time.perf_counter() - shown > PROGRESS_S:  # it walks every request: not per submission
            shown = time.perf_counter()
            _show(progress, task, mode, tracked, len(requests), start)


def _drain(cs, tracked: list, mode: str, total: int, start: float, drain_timeout: float, progress, task) -> None:
    """Wait for every request to end; past drain_timeout the rest are aborted."""
    deadline = time.perf_counter() + drain_timeout
    for _, _, t in tracked:
        while not t.done.wait(0.2):
            if progress:
                _show(progress, task, mode, tracked, total, start)
            if time.perf_counter() > deadline:
                cs.abort(t.rid, "benchmark drain timeout")
                break


def _records(tracked: list, start: float) -> list[RequestRecord]:
    records = []
    for arrival, req, t in tracked:
        ids = t.tokens.get(0, [])
        aborted = t.error is not None and t.finish.get(0) == "abort"
        records.append(RequestRecord(
            arrival=arrival - start, input_len=len(req.prompt_ids), output_len=len(ids),
            first_token=None if t.first_token_time is None else t.first_token_time - start,
            token_times=[x - start for x in t.token_times], end=None if t.finish_time is None else t.finish_time - start,
            error=t.error, aborted=aborted, path=t.path, workers=t.ranks,
            predicted=t.decision.get("predicted", {}).get(t.path, {}) if t.decision else {},
            predicted_raw=t.decision.get("predicted_raw", {}).get(t.path, {}) if t.decision else {},
            decision={k: t.decision[k] for k in ("predicted", "predicted_raw", "loads", "cached_tokens", "decided_by")
                      if k in t.decision},
            submitted=t.arrival - start, dispatched=None if t.dispatch_time is None else t.dispatch_time - start,
            **{k: None if at is None else at - start for k, at in (
                ("received", t.worker_received), ("launched", t.worker_launched), ("landed", t.worker_landed))}))
    return records


def _show(progress, task, mode: str, tracked: list, total: int, start: float) -> None:
    """The progress line: sent, finished and failed requests, and output tokens/s so far."""
    done = [t for _, _, t in tracked if t.done.is_set()]
    failed = sum(t.error is not None for t in done)
    tokens = sum(len(t.tokens.get(0, [])) for _, _, t in tracked)
    rate = tokens / max(time.perf_counter() - start, 1e-9)
    progress.update(task, completed=len(done),
                    description=f"{mode}: sent {len(tracked)}/{total}, failed {failed}, {rate:,.0f} out tok/s")


def warmup_filter(records: list[RequestRecord], warmup_s: float) -> list[RequestRecord]:
    return [r for r in records if r.arrival >= warmup_s] if warmup_s > 0 else records


def rate_label(rate: float):
    return "inf" if math.isinf(rate) else rate
