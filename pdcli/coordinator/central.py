"""CentralScheduler: the coordinator in the main process. It starts one worker process per (device, role),
routes each request to a path, drives the prefill -> decode handoff, streams tokens back and keeps
per-path accounting. A router thread owns all worker pipes."""
from __future__ import annotations

import itertools
import multiprocessing as mp
import queue
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from pdcli.coordinator.policy import RouteInput, make_policy
from pdcli.router.adaptive import WorkerLoad, busy, mark_gpu_sharing
from pdcli.outputs import CompletionOutput, RequestOutput
from pdcli.sampling_params import SamplingParams
from pdcli.workers.layout import WorkerSpec, transfer_pair
from pdcli.workers.mps import start_for
from pdcli.workers.worker import worker_main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def same_gpu(a: WorkerSpec, b: WorkerSpec) -> bool:
    """Workers that hand KV over through CUDA IPC (NCCL cannot pair two ranks on one GPU)."""
    return transfer_pair(a, b) == "gpu-ipc"


@dataclass
class WorkerHandle:
    spec: WorkerSpec
    proc: mp.Process
    conn: object
    alive: bool = True
    info: dict = field(default_factory=dict)
    inflight: set = field(default_factory=set)  # request ids this worker holds
    # messages to the worker go through a queue and a sender thread, so neither a caller nor the router
    # thread ever blocks on a full pipe (a worker blocked on its own sends would otherwise deadlock them)
    outbox: queue.Queue = field(default_factory=queue.Queue)
    last_step_end: float | None = None  # perf_counter when its last step's tokens message came


BUSY_EMA = 0.1  # weight of the newest sample of a worker's busy fraction (~ the last 10 decisions)


@dataclass
class Tracked:
    rid: str
    tag: int  # KV-transfer tag
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    path: str  # collocated | disaggregated
    arrival: float
    first: int | None = None  # collocated worker or prefill worker rank
    second: int | None = None  # decode worker rank
    stage: str = "queued"  # collocated | prefill | handoff | decode | done
    tokens: dict = field(default_factory=dict)  # completion index -> token ids
    finish: dict = field(default_factory=dict)  # completion index -> finish reason
    error: str | None = None
    first_token_time: float | None = None
    token_times: list = field(default_factory=list)  # arrival time of each token of completion 0
    finish_time: float | None = None
    transfer_bytes: int = 0
    transfer_s: float = 0.0  # device time of the prefill worker's send: all of it, or what the prefill left exposed
    transfer_kind: str = ""  # whole | layers | ipc
    transfer_reported: threading.Event = field(default_factory=threading.Event)  # the prefill worker's "sent"
    ipc_copy_asked: bool = False  # the prefill worker was told to copy into the decode worker's blocks
    decision: dict = field(default_factory=dict)  # the route taken, by which policy, with predicted costs
    events: queue.Queue = field(default_factory=queue.Queue)  # (index, new token ids, finish reason | None)
    waker: object = None  # called (from the router thread) after each event, e.g. to wake an asyncio task
    done: threading.Event = field(default_factory=threading.Event)


class CentralScheduler:
    def __init__(self, model: str, layout: list[WorkerSpec], mode: str = "collocated", sampling_seed: int = 0,
                 startup_timeout: float = 600.0, params_dir: str | None = None, slo_ttft_ms: float | None = None,
                 slo_tpot_ms: float | None = None, pd_on_collocated: bool = False, mps: bool | None = None,
                 **engine_kwargs):
        """pd_on_collocated: collocated workers on different devices also prefill and decode for each other
        (the disaggregated path without dedicated P/D workers: no GPU is shared by two processes).
        mps: run workers that share a GPU under CUDA MPS (None: where it can start; see workers/mps.py)."""
        from pdcli.models.loader import resolve

        self.policy = make_policy(mode)
        self.pd_on_collocated = pd_on_collocated
        source = resolve(model)
        from pdcli.models.arch import ModelArch

        self.vocab_size = ModelArch.from_hf_config(source.hf_config).vocab_size
        self.router = None  # the cost-model router, when a fitted params.json is given
        if params_dir is not None:
            from pdcli.router.adaptive import AdaptiveRouter
            from pdcli.router.fit import load_cost_model

            self.router = AdaptiveRouter(load_cost_model(params_dir, model), slo_ttft_ms, slo_tpot_ms)
        self.tokenizer = source.tokenizer
        self.lock = threading.RLock()
        self.requests: dict[str, Tracked] = {}
        self.active: set[str] = set()  # request ids not yet done
        self.ids = itertools.count()
        self._turn = itertools.count()
        self.rng = random.Random(sampling_seed)  # seeds of unseeded requests, shared by P and D
        self.stats_replies: queue.Queue = queue.Queue()
        self._busy_avg: dict[int, float] = {}  # rank -> average busy fraction, for the router's GPU sharing
        self.accounting = {p: dict(requests=0, output_tokens=0, failed=0, transfer_bytes=0, transfer_s=0.0)
                           for p in ("collocated", "disaggregated")}
        self.kv_layerwise = True  # NCCL/gloo sends in groups of layers during the last prefill chunk when possible
        ctx = mp.get_context("spawn")
        import torch.distributed as dist

        # the workers' rendezvous store lives here, not in rank 0: a worker that stops first cannot take it down
        # under the others (NCCL's monitor thread then logs connection errors at every shutdown)
        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        init = ("127.0.0.1", self._store.port)
        self.workers: list[WorkerHandle] = []
        self.mps = start_for(layout, mps)
        self.mps_on = self.mps is not None  # workers run under MPS (kept once the daemon stops at shutdown)
        self._closed = False
        self._senders_started = False
        try:
            self._start_workers(ctx, model, layout, init, engine_kwargs)
            self._wait_ready(startup_timeout)
        except BaseException:
            self.shutdown()
            raise
        for w in self.workers:
            threading.Thread(target=self._sender, args=(w,), name=f"pdcli-send-{w.spec.rank}", daemon=True).start()
        self._senders_started = True
        self.thread = threading.Thread(target=self._route_loop, name="pdcli-router", daemon=True)
        self.thread.start()

    # ---- startup / shutdown ----
    def _start_workers(self, ctx, model: str, layout: list[WorkerSpec], init: tuple[str, int],
                       engine_kwargs: dict) -> None:
        nccl = [(p.rank, d.rank) for p in layout for d in layout
                if self.can_hand_off(p, d) and transfer_pair(p, d) == "gpu-nccl"]
        for spec in layout:
            parent, child = ctx.Pipe()
            kwargs = dict(engine_kwargs)
            sharing = sum(s.device == spec.device for s in layout)
            gpu = spec.device.startswith("cuda")
            if gpu and sharing > 1:  # workers on one GPU split its memory
                from pdcli.config import CacheConfig

                util = kwargs.get("gpu_memory_utilization") or CacheConfig.gpu_memory_utilization
                kwargs["gpu_memory_utilization"] = util / sharing
            env = self.mps.env if self.mps and gpu else {}
            proc = ctx.Process(target=worker_main, args=(spec, model, kwargs, child, init, list(layout), nccl, env),
                               daemon=True, name=f"pdcli-{spec.role}-{spec.rank}")
            proc.start()
            child.close()
            self.workers.append(WorkerHandle(spec, proc, parent))

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for w in self.workers:
            while not w.conn.poll(0.1):
                if not w.proc.is_alive():
                    raise RuntimeError(f"worker {w.spec.role} on {w.spec.device} exited during startup")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker {w.spec.role} on {w.spec.device} did not start in {timeout:.0f} s")
            msg = w.conn.recv()
            if msg[0] != "ready":
                raise RuntimeError(f"worker {w.spec.role} on {w.spec.device} failed to start:\n{msg[-1]}")
            w.info = msg[1]
        self.max_model_len = min(w.info["max_model_len"] for w in self.workers)
        for p in (w for w in self.workers if w.spec.role == "prefill"):
            peers = {d.spec.rank: d.info["kv_ipc"] for d in self.workers
                     if d.spec.role == "decode" and same_gpu(p.spec, d.spec)}
            if peers:
                p.conn.send(("peers", peers))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every worker; requests still running end with an error."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        # prefill workers first: they map decode workers' pools (CUDA IPC), which must outlive the mapping
        for phase in (("prefill",), ("collocated", "decode")):
            group = [w for w in self.workers if w.spec.role in phase]
            for w in group:
                if self._senders_started:
                    w.outbox.put(("shutdown",))
                    w.outbox.put(None)  # ends the sender thread
                else:  # failed during startup
                    try:
                        w.conn.send(("shutdown",))
                    except (BrokenPipeError, OSError):
                        pass
            for w in group:
                w.proc.join(max(0.0, deadline - time.monotonic()))
                if w.proc.is_alive():
                    w.proc.kill()
                    w.proc.join(5)
        with self.lock:
            for t in list(self.requests.values()):
                if not t.done.is_set():
                    self._fail(t, "the server shut down")
        self._store = None  # every worker has stopped
        if self.mps is not None:
            self.mps.stop()
            self.mps = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    # ---- requests ----
    def live(self, role: str) -> list[WorkerHandle]:
        return [w for w in self.workers if w.alive and w.spec.role == role]

    def submit(self, prompt_ids: list[int], params: SamplingParams, mode: str | None = None,
               request_id: str | None = None) -> Tracked:
        with self.lock:
            rid = request_id or f"r{next(self.ids)}"
            seed = params.seed if params.seed is not None else self.rng.getrandbits(63)
            t = Tracked(rid, len(self.requests) + 1, list(prompt_ids), params, seed, "", time.perf_counter())
            self.requests[rid] = t
            self.active.add(rid)
            route = self._route(t, mode)
            if route is None:
                self._fail(t, "no live worker can serve this request")
                return t
            t.path, w, d = route
            self.accounting[t.path]["requests"] += 1
            if d is None:
                t.first, t.stage = w.spec.rank, "collocated"
            else:
                t.first, t.second, t.stage = w.spec.rank, d.spec.rank, "prefill"
                d.inflight.add(rid)
                # the decode worker reserves blocks now, so the KV can stream to it while the prompt prefills
                self._send(d, ("reserve", rid, t.prompt_ids, params, seed, same_gpu(w.spec, d.spec)))
            w.inflight.add(rid)
            self._send(w, ("add", rid, t.prompt_ids, params, seed, d is not None))
            return t

    # ---- routing ----
    def can_hand_off(self, p: WorkerSpec, d: WorkerSpec) -> bool:
        """p may prefill for d: a prefill and a decode worker (on one GPU: through CUDA IPC), or, with
        pd_on_collocated, two collocated workers (or one and a P/D worker) on different devices."""
        if p.rank == d.rank:
            return False
        if p.role == "prefill" and d.role == "decode":
            return True
        return self.pd_on_collocated and p.role in ("prefill", "collocated") and \
            d.role in ("decode", "collocated") and (p.device != d.device or p.device == "cpu")

    def pairs(self) -> list[tuple[WorkerHandle, WorkerHandle]]:
        live = [w for w in self.workers if w.alive]
        return [(p, d) for p in live for d in live if self.can_hand_off(p.spec, d.spec)]

    def _least(self, pairs: list, key):
        """The pair of least key; ties taken in turn (two collocated workers serve each other both ways)."""
        if not pairs:
            return None
        best = min(map(key, pairs))
        tied = [pd for pd in pairs if key(pd) == best]
        return tied[next(self._turn) % len(tied)]

    def _route(self, t: Tracked, mode: str | None):
        """(path, collocated or prefill worker, decode worker or None), or None if no live worker can."""
        colls = self.live("collocated")
        n_in = lambda w: len(w.inflight)  # noqa: E731
        coll = min(colls, key=n_in) if colls else None
        if t.params.n > 1:  # forks share KV inside one engine
            return ("collocated", coll, None) if coll else None
        pairs = self.pairs()
        policy = make_policy(mode) if mode else self.policy
        if policy.name == "adaptive" and self.router is not None and coll and pairs:
            loads = self.worker_loads()
            load = lambda w: loads[w.spec.rank].queued_prefill_tokens + loads[w.spec.rank].decode_batch  # noqa: E731
            coll = min(colls, key=load)
            pre, dec = self._least(pairs, lambda pd: (load(pd[0]), load(pd[1])))
            d = self.router.decide(len(t.prompt_ids), t.params.max_tokens, loads[coll.spec.rank], loads[pre.spec.rank],
                                   loads[dec.spec.rank], transfer_pair(pre.spec, dec.spec))
            t.decision = dict(policy="adaptive", decided_by="cost-model", path=d.path, predicted=d.predicted,
                              predicted_raw=d.predicted_raw, roles=d.roles, predicted_output_len=d.output_len)
            return (d.path, coll, None) if d.path == "collocated" else (d.path, pre, dec)
        pair = self._least(pairs, lambda pd: (n_in(pd[0]), n_in(pd[1])))
        r = RouteInput(len(t.prompt_ids), t.params,
                       prefill_queue=n_in(pair[0]) if pair else 0, collocated_load=n_in(coll) if coll else 0)
        want = policy.choose(r)
        t.decision = dict(policy=policy.name, decided_by=getattr(policy, "decided_by", policy.name), path=want)
        if pair and (want == "disaggregated" or not coll):
            return ("disaggregated", *pair)
        return ("collocated", coll, None) if coll else None

    def worker_loads(self):
        """Per-rank live state from the coordinator's own bookkeeping (what the router sees); each call also
        samples every worker's busy fraction."""
        now = time.perf_counter()
        loads = {w.spec.rank: WorkerLoad(role=w.spec.role, async_steps=w.spec.role != "prefill",
                                         since_step_ms=None if w.last_step_end is None else (now - w.last_step_end) * 1e3)
                 for w in self.workers}
        for rid in self.active:
            t = self.requests[rid]
            if not t.path:
                continue
            generated = sum(len(v) for v in t.tokens.values())
            if t.stage in ("collocated", "prefill") and generated == 0:
                loads[t.first].queued_prefill_tokens += len(t.prompt_ids)
                last = self.workers[t.first].last_step_end
                if last is None or t.arrival > last:  # not in a step the worker has already scheduled
                    loads[t.first].queued_since_step_tokens += len(t.prompt_ids)
            elif t.stage == "collocated":
                loads[t.first].decode_batch += 1
                loads[t.first].decode_ctx += len(t.prompt_ids) + generated
            elif t.stage == "handoff":
                loads[t.second].inflight_transfers += 1
            elif t.stage == "decode":
                loads[t.second].decode_batch += 1
                loads[t.second].decode_ctx += len(t.prompt_ids) + generated
        for r, w in loads.items():  # sampled at each decision: Poisson arrivals see time averages
            self._busy_avg[r] = (1 - BUSY_EMA) * self._busy_avg.get(r, 0.0) + BUSY_EMA * busy(w)
        # also under MPS: measured on one H100 with three workers, a decode step ran ~2x the model's time
        # beside another busy worker (two decode batches each read all the weights), a prefill 2-3x
        mark_gpu_sharing(loads, {w.spec.rank: w.spec.device for w in self.workers if w.alive}, self._busy_avg)
        return loads

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
            for rank in (t.first, t.second):
                if rank is not None and self.workers[rank].alive:
                    # blocks an IPC copy may still be writing are freed by the decode worker when it is done
                    self._send(self.workers[rank], ("abort", rid, not t.ipc_copy_asked))
            self._fail(t, reason, finish="abort")

    def output(self, t: Tracked) -> RequestOutput:
        n = max(1, t.params.n)
        outs = []
        for i in range(n):
            ids = t.tokens.get(i, [])
            reason = t.finish.get(i, "error" if t.error else None)
            visible = ids[:-1] if reason == "stop" and ids and (ids[-1] in self.tokenizer.eos_token_ids or
                                                                ids[-1] in t.params.stop_token_ids) else ids
            outs.append(CompletionOutput(i, self.text(t, visible, reason), ids, reason))
        return RequestOutput(t.rid, None, t.prompt_ids, outs, t.done.is_set(), error=t.error,
                             metrics=dict(arrival_time=t.arrival, first_token_time=t.first_token_time,
                                          finished_time=t.finish_time, path=t.path, decision=t.decision,
                                          transfer_bytes=t.transfer_bytes, transfer_s=t.transfer_s,
                                          transfer_kind=t.transfer_kind))

    def text(self, t: Tracked, ids: list[int], reason: str | None) -> str:
        """Decoded output, cut at the first stop string (the worker stopped on it)."""
        text = self.tokenizer.decode(ids)
        if t.params.stop:
            from pdcli.engine.detokenizer import find_stop

            i = find_stop(text, text, t.params.stop)
            if i >= 0:
                stop = next(s for s in t.params.stop if text.startswith(s, i))
                text = text[:i + len(stop)] if t.params.include_stop_str_in_output else text[:i]
        return text

    def worker_stats(self, timeout: float = 10.0) -> list[dict]:
        """Per-worker pool and queue state (block pools must be full again when idle)."""
        live = [w for w in self.workers if w.alive]
        for w in live:
            self._send(w, ("stats",))
        out = []
        for _ in live:
            out.append(self.stats_replies.get(timeout=timeout))
        return sorted(out, key=lambda s: s["rank"])

    # ---- the router thread ----
    def _send(self, w: WorkerHandle, msg) -> None:
        w.outbox.put(msg)

    def _sender(self, w: WorkerHandle) -> None:
        while True:
            msg = w.outbox.get()
            if msg is None:
                return
            try:
                w.conn.send(msg)
            except (BrokenPipeError, OSError, EOFError):
                if not self._closed:
                    self._worker_died(w, "its pipe closed")
                return

    def _route_loop(self) -> None:
        conns = {w.conn: w for w in self.workers}
        last_check = time.monotonic()
        while not self._closed:
            ready = wait([c for c, w in conns.items() if w.alive], timeout=0.2)
            for c in ready:
                w = conns[c]
                try:
                    while c.poll():
                        self._on_message(w, c.recv())
                except (EOFError, OSError):
                    if not self._closed:
                        self._worker_died(w, "it exited")
            if time.monotonic() - last_check > 0.5:
                last_check = time.monotonic()
                for w in self.workers:
                    if w.alive and not w.proc.is_alive() and not self._closed:
                        self._worker_died(w, f"it exited with code {w.proc.exitcode}")

    def _on_message(self, w: WorkerHandle, msg) -> None:
        kind = msg[0]
        if kind == "stats":
            self.stats_replies.put(msg[1])
            return
        if kind == "fatal":
            self._worker_died(w, msg[1].strip().splitlines()[-1])
            return
        with self.lock:
            if kind == "sending":  # the decode worker must post these receives, in this order, whatever
                _, dst, items, layerwise = msg  # became of the requests (NCCL matches sends by order)
                if self.workers[dst].alive:
                    self._send(self.workers[dst], ("recv", w.spec.rank, items, layerwise))
                return
            if kind == "sent":
                _, rid, nbytes, seconds, ipc_peer, how = msg
                if ipc_peer is not None and self.workers[ipc_peer].alive:
                    # an IPC copy into the decode worker's blocks is done: it admits the sequence or frees them
                    self._send(self.workers[ipc_peer], ("ipc_done", rid, nbytes))
                acc = self.accounting["disaggregated"]
                acc["transfer_bytes"] += nbytes
                acc["transfer_s"] += seconds
                if rid in self.requests and nbytes:
                    t = self.requests[rid]
                    t.transfer_s, t.transfer_kind = seconds, how
                    t.transfer_reported.set()
                return
            if kind == "tokens":
                w.last_step_end = now = time.perf_counter()
                for item in msg[1]:
                    self._on_tokens(*item, now)
                return
            t = self.requests.get(msg[1])
            if t is None or t.done.is_set():
                if kind == "prefilled":
                    self._send(w, ("drop", msg[1]))  # nobody will take this KV any more
                elif kind == "reserved":
                    self._send(w, ("abort", msg[1], True))  # the prefill worker was never told of these blocks
                return
            if kind == "prefilled":
                d = self.workers[t.second]
                t.stage = "handoff"
                self.workers[t.first].inflight.discard(t.rid)
                if not d.alive:
                    self._send(w, ("drop", t.rid))
                    self._fail(t, f"decode worker rank {d.spec.rank} is not alive")
                    return
                self._send(d, ("first", t.rid, msg[2]))
            elif kind == "reserved":
                blocks = msg[2]
                t.ipc_copy_asked = blocks is not None
                self._send(self.workers[t.first], ("dest", t.rid, t.second, t.tag, blocks, self.kv_layerwise))
            elif kind == "received":
                t.stage = "decode"
                t.transfer_bytes = msg[2]
            elif kind == "error":
                self._fail(t, msg[2])

    def _on_tokens(self, rid: str, index: int, ids: list[int], reason: str | None, now: float) -> None:
        """One sequence's tokens from a step that landed at `now` (perf_counter)."""
        t = self.requests.get(rid)
        if t is None or t.done.is_set():
            return
        t.first_token_time = t.first_token_time or now
        t.tokens.setdefault(index, []).extend(ids)
        if index == 0:
            t.token_times.extend([now] * len(ids))
        self.accounting[t.path]["output_tokens"] += len(ids)
        t.events.put((index, ids, reason))
        if t.waker:
            t.waker()
        if reason is not None:
            t.finish[index] = reason
            if len(t.finish) == max(1, t.params.n):
                if t.stage == "prefill" and t.second is not None and self.workers[t.second].alive:
                    self._send(self.workers[t.second], ("abort", t.rid, not t.ipc_copy_asked))
                self._complete(t)

    def _complete(self, t: Tracked) -> None:
        t.stage, t.finish_time = "done", time.perf_counter()
        if self.router is not None and not t.error and t.tokens:
            n = len(t.tokens.get(0, []))
            measured = dict(ttft_ms=(t.first_token_time - t.arrival) * 1e3)
            if n > 1:
                measured["tpot_ms"] = (t.finish_time - t.first_token_time) * 1e3 / (n - 1)
            # output length; and, for the cost model's decisions (the only ones with roles), the calibration
            self.router.observe(len(t.prompt_ids), n, t.decision.get("roles", {}).get(t.path),
                                t.decision.get("predicted_raw", {}).get(t.path), measured)
        self.active.discard(t.rid)
        for rank in (t.first, t.second):
            if rank is not None:
                self.workers[rank].inflight.discard(t.rid)
        t.done.set()

    def _fail(self, t: Tracked, message: str, finish: str = "error") -> None:
        t.error = message
        for i in range(max(1, t.params.n)):
            t.finish.setdefault(i, finish)
        if t.path:
            self.accounting[t.path]["failed"] += 1
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
            for t in list(self.requests.values()):
                if t.done.is_set() or rank not in (t.first, t.second):
                    continue
                if rank == t.second and t.stage == "handoff" and self.workers[t.first].alive:
                    self._send(self.workers[t.first], ("drop", t.rid))  # free the prefilled KV
                if rank == t.first and t.stage in ("prefill", "handoff") and t.second is not None and \
                        self.workers[t.second].alive:
                    self._send(self.workers[t.second], ("abort", t.rid, True))  # a dead sender writes no more
                if rank == t.second and t.stage == "prefill" and self.workers[t.first].alive:
                    self._send(self.workers[t.first], ("abort", t.rid, True))
                if rank == t.first and t.stage == "decode":
                    continue  # the prefill worker is done with it
                self._fail(t, f"{w.spec.role} worker rank {rank} on {w.spec.device} died ({why})")
