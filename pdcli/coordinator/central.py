"""CentralScheduler: the coordinator in the main process. It owns the requests: routes each one
(coordinator/routing.py) to a collocated worker or a P/D pair (coordinator/handoff_relay.py), turns the
workers' messages into each request's tokens, and ends every request with output or an error. The worker
processes and their pipes are coordinator/worker_pool.py's; the life of a request is in docs/structure.md."""
from __future__ import annotations

import itertools
import logging
import queue
import random
import threading
import time
from dataclasses import asdict

from pdcli.coordinator.handoff_relay import HandoffRelay
from pdcli.coordinator.output import OutputAssembler
from pdcli.coordinator.routing import Routing, can_hand_off
from pdcli.coordinator.tracked import Stage, Tracked
from pdcli.coordinator.worker_pool import SHUTDOWN_S, WorkerHandle, WorkerPool
from pdcli.messages import RequestFailed, StatsRequest, StepTokens, Submit, WorkerStats, dispatch
from pdcli.outputs import RequestOutput
from pdcli.sampling_params import SamplingParams
from pdcli.workers.layout import WorkerSpec

logger = logging.getLogger("pdcli.coordinator")

__all__ = ["CentralScheduler", "Overloaded", "Tracked"]


class Overloaded(RuntimeError):
    """More requests would wait for a first token than max_waiting allows."""

    def __init__(self, waiting: int, limit: int):
        super().__init__(f"the server is overloaded: {waiting} requests are waiting (at most {limit}); retry later")
        self.waiting, self.limit = waiting, limit


class CentralScheduler:
    def __init__(self, model: str, layout: list[WorkerSpec], mode: str = "collocated", sampling_seed: int = 0,
                 startup_timeout: float = 600.0, params_dir: str | None = None, slo_ttft_ms: float | None = None,
                 slo_tpot_ms: float | None = None, pd_on_collocated: bool = False, mps: bool | None = None,
                 slo_ttft_per_token_ms: float = 0.0, host: str = "127.0.0.1", **engine_kwargs):
        """pd_on_collocated: collocated workers on different devices also prefill and decode for each other
        (the disaggregated path without dedicated P/D workers: no GPU is shared by two processes).
        mps: run workers that share a GPU under CUDA MPS (None: where it can start; see workers/mps.py); host: the
        address the workers' store listens on (a cluster's, pdcli/cluster/; else loopback)."""
        from pdcli.coordinator.policy import make_policy
        from pdcli.models.arch import ModelArch
        from pdcli.models.loader import resolve
        from pdcli.models.tokenizer import eos_token_ids

        make_policy(mode)  # an unknown mode fails before any worker starts
        source = resolve(model)
        arch = ModelArch.from_hf_config(source.hf_config)
        self.vocab_size, self.tokenizer = arch.vocab_size, source.tokenizer
        self.outputs = OutputAssembler(self.tokenizer, eos_token_ids(arch, self.tokenizer))
        self.router = self._router(params_dir, model, slo_ttft_ms, slo_tpot_ms, slo_ttft_per_token_ms)
        self.pd_on_collocated = pd_on_collocated
        self.lock = threading.RLock()
        self.requests: dict[str, Tracked] = {}
        self.active: set[str] = set()  # request ids not yet done
        self.waiting: set[str] = set()  # request ids submitted that have no first token yet
        self.max_waiting: int | None = None  # submit_all refuses requests past this many waiting
        self.ids = itertools.count()
        self.rng = random.Random(sampling_seed)  # seeds of unseeded requests, shared by P and D
        self.stats_replies: queue.Queue = queue.Queue()
        self.accounting = {p: dict(requests=0, output_tokens=0, failed=0, aborted=0, transfer_bytes=0, transfer_s=0.0)
                           for p in ("collocated", "disaggregated")}
        self._closed = False
        self.pool = WorkerPool(model, layout, engine_kwargs, lambda p, d: can_hand_off(p, d, pd_on_collocated), mps,
                               startup_timeout, host)
        self.workers, self.mps_on, self.max_model_len = self.pool.workers, self.pool.mps_on, self.pool.max_model_len
        from pdcli.config import CacheConfig

        self.block_size = engine_kwargs.get("block_size") or CacheConfig.block_size
        self.routing = Routing(self.pool, mode, self.router, pd_on_collocated, self.block_size,
                               engine_kwargs.get("enable_prefix_caching", CacheConfig.enable_prefix_caching))
        self.relay = HandoffRelay(self.pool, self.requests, self._fail, self.accounting["disaggregated"])
        self.handlers = {**{kind: getattr(self, name) for kind, name in self.HANDLERS.items()}, **self.relay.handlers}
        self.pool.start_io(self._on_message, self._worker_died)
        self.pool.wait_pairs()

    def add_workers(self, handles: list[WorkerHandle]) -> None:
        """Workers of a node that joined (pdcli/cluster/head.py), ready: routed to once their KV pairs are made."""
        with self.lock:
            self.pool.add_workers(handles)
            self.routing.added(handles)
            lens = [w.info.max_model_len for w in self.pool.live()]
            self.max_model_len = min(lens) if lens else self.max_model_len

    # messages from the workers, besides the handoff's (HandoffRelay.HANDLERS) and the pool's (Ready, WorkerFailed)
    HANDLERS = {StepTokens: "_on_step_tokens", RequestFailed: "_on_request_failed", WorkerStats: "_on_stats"}

    @staticmethod
    def _router(params_dir: str | None, model: str, slo_ttft_ms: float | None, slo_tpot_ms: float | None,
                slo_ttft_per_token_ms: float):
        """The cost-model router, when a fitted params.json is given."""
        if params_dir is None:
            return None
        from pdcli.router.adaptive import AdaptiveRouter
        from pdcli.router.fit import load_cost_model

        return AdaptiveRouter(load_cost_model(params_dir, model), slo_ttft_ms, slo_tpot_ms,
                              slo_ttft_per_token_ms=slo_ttft_per_token_ms)

    @property
    def kv_layerwise(self) -> bool:
        return self.relay.kv_layerwise

    @kv_layerwise.setter
    def kv_layerwise(self, on: bool) -> None:
        self.relay.kv_layerwise = on

    def shutdown(self, timeout: float = SHUTDOWN_S) -> None:
        """Stop every worker (killed after `timeout` s, or at once on Ctrl-C); requests still running end
        with an error."""
        if self._closed:
            return
        self._closed = True
        try:
            self.pool.shutdown(timeout)
        finally:
            with self.lock:
                for t in list(self.requests.values()):
                    if not t.done.is_set():
                        self._fail(t, "the server shut down")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    # ---- requests ----
    def live(self, role: str) -> list[WorkerHandle]:
        return self.pool.live(role)

    def submit(self, prompt_ids: list[int], params: SamplingParams, mode: str | None = None,
               request_id: str | None = None) -> Tracked:
        with self.lock:
            rid = request_id or f"r{next(self.ids)}"
            seed = params.seed if params.seed is not None else self.rng.getrandbits(63)
            t = Tracked(rid, len(self.requests) + 1, list(prompt_ids), params, seed, "", time.perf_counter())
            self.requests[rid] = t
            self.active.add(rid)
            self.waiting.add(rid)
            route = self.routing.route(t, mode, lambda: [self.requests[r] for r in self.active])
            if route is None:
                self._fail(t, "no live worker can serve this request")
                return t
            t.path = route.path
            self.accounting[t.path]["requests"] += 1
            if route.decode is None:
                t.prefill_rank, t.stage = route.worker.spec.rank, Stage.COLLOCATED
                route.worker.inflight.add(rid)
                self.pool.send(route.worker, Submit(rid, t.prompt_ids, params, seed))
            else:
                self.relay.start(t, route.worker, route.decode)
            t.dispatch_time = time.perf_counter()
            logger.debug("%s: %d prompt tokens -> %s on %s", rid, len(t.prompt_ids), t.path, t.ranks)
            return t

    def submit_all(self, prompts: list[list[int]], params: list[SamplingParams], request_ids: list[str]) -> list[Tracked]:
        """Submit every prompt, or none: Overloaded when max_waiting requests would be waiting for a first token."""
        with self.lock:
            if self.max_waiting is not None and len(self.waiting) + len(prompts) > self.max_waiting:
                raise Overloaded(len(self.waiting), self.max_waiting)
            return [self.submit(p, sp, request_id=rid) for p, sp, rid in zip(prompts, params, request_ids)]

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 mode: str | None = None, timeout: float | None = None) -> list[RequestOutput]:
        params = params if isinstance(params, list) else [params] * len(prompts)
        tracked = [self.submit(p, sp, mode) for p, sp in zip(prompts, params)]
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in tracked:
            if not t.done.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
                self.abort(t.rid, "timed out")
        return [self.output(t) for t in tracked]

    def wait_transfer(self, t: Tracked, timeout: float) -> bool:
        """Wait until t has ended and, if its KV was sent, the prefill worker has reported the send (the
        report may come after the decode worker's last token). False on timeout."""
        deadline = time.monotonic() + timeout
        if not t.done.wait(timeout):
            return False
        return t.error is not None or t.path != "disaggregated" or \
            t.transfer_reported.wait(max(0.0, deadline - time.monotonic()))

    def abort(self, rid: str, reason: str = "aborted") -> None:
        with self.lock:
            t = self.requests.get(rid)
            if t is None or t.done.is_set():
                return
            self.relay.abort(t)
            self._fail(t, reason, finish="abort")

    def output(self, t: Tracked) -> RequestOutput:
        return self.outputs.output(t)

    def worker_stats(self, timeout: float = 10.0) -> list[dict]:
        """Per-worker pool and queue state (block pools must be full again when idle)."""
        live = self.pool.live()
        for w in live:
            self.pool.send(w, StatsRequest())
        stats = [self.stats_replies.get(timeout=timeout) for _ in live]
        for s in stats:
            s["node"] = self.pool[s["rank"]].spec.node
        return sorted(stats, key=lambda s: s["rank"])

    # ---- messages from the workers (on the pipe reader thread) ----
    def _on_message(self, w: WorkerHandle, msg) -> None:
        with self.lock:
            dispatch(self.handlers, msg, "the coordinator", w)

    def _on_stats(self, w: WorkerHandle, msg: WorkerStats) -> None:
        self.stats_replies.put(asdict(msg))

    def _on_request_failed(self, w: WorkerHandle, msg: RequestFailed) -> None:
        t = self.requests.get(msg.request_id)
        if t is not None and not t.done.is_set():
            self._fail(t, msg.message)

    def _on_step_tokens(self, w: WorkerHandle, msg: StepTokens) -> None:
        """One step of worker w landed now: each touched sequence's new tokens."""
        w.last_step_end = now = time.perf_counter()
        for rid, computed in msg.prefilled or ():
            t = self.requests.get(rid)
            if t is not None:
                t.prefilled = computed
        for rid, *marks in msg.received or ():
            t = self.requests.get(rid)
            if t is not None and t.worker_received is None:
                t.worker_received, t.worker_launched, t.worker_landed = marks
        for k, (rid, index, ids, reason) in enumerate(zip(msg.request_ids, msg.indices, msg.token_ids,
                                                          msg.finish_reasons)):
            t = self.requests.get(rid)
            if t is None or t.done.is_set():
                continue
            if t.first_token_time is None:
                t.first_token_time = now
                self.waiting.discard(rid)
            t.tokens.setdefault(index, []).extend(ids)
            if msg.logprobs is not None and msg.logprobs[k] is not None:
                t.logprobs.setdefault(index, []).extend(msg.logprobs[k])
            if index == 0:
                t.token_times.extend([now] * len(ids))
            self.accounting[t.path]["output_tokens"] += len(ids)
            t.events.put((index, ids, reason))
            if t.waker:
                t.waker()
            if reason is not None:
                t.finish[index] = reason
                if len(t.finish) == max(1, t.params.n):
                    self.relay.ended_on_prefill(t)
                    self._complete(t)

    def _complete(self, t: Tracked) -> None:
        t.stage, t.finish_time = Stage.DONE, time.perf_counter()
        if self.router is not None and not t.error and t.tokens:
            n = len(t.tokens.get(0, []))
            measured = dict(ttft_ms=(t.first_token_time - t.arrival) * 1e3)
            if n > 1:
                measured["tpot_ms"] = (t.finish_time - t.first_token_time) * 1e3 / (n - 1)
            # output length; and, for the decisions the cost model priced (those with roles), the calibration
            self.router.observe(len(t.prompt_ids), n, t.decision.get("roles", {}).get(t.path),
                                t.decision.get("predicted_raw", {}).get(t.path), measured)
        self.active.discard(t.rid)
        self.waiting.discard(t.rid)
        for rank in t.ranks:
            self.pool[rank].inflight.discard(t.rid)
        t.done.set()

    def _fail(self, t: Tracked, message: str, finish: str = "error") -> None:
        t.error = message
        for i in range(max(1, t.params.n)):
            t.finish.setdefault(i, finish)
        if t.path:  # an abort (the client left, a timeout) is not a failure
            self.accounting[t.path]["aborted" if finish == "abort" else "failed"] += 1
        t.events.put((0, [], finish))
        if t.waker:
            t.waker()
        self._complete(t)

    def _worker_died(self, w: WorkerHandle, why: str) -> None:
        with self.lock:
            if not w.alive:
                return
            w.alive = False
            rank = w.spec.rank
            logger.error("%s worker rank %d on %s died (%s)", w.spec.role, rank, w.spec.device, why)
            for t in list(self.requests.values()):
                if not t.done.is_set() and rank in t.ranks and self.relay.worker_died(t, rank):
                    self._fail(t, f"{w.spec.role} worker rank {rank} on {w.spec.device} died ({why})")
