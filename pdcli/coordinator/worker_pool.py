"""The workers of a coordinator: start (one process per local (device, role), their rendezvous store, MPS for
workers sharing a GPU), workers on other nodes added as they join (pdcli/cluster/head.py), the KV pairs'
process groups made as workers come, the connections (a sender thread per worker, one thread reading them
all), death detection, and stop."""
from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Callable

from pdcli.distributed.store import host_store
from pdcli.logger import current_level
from pdcli.messages import ConnectPeers, PairSpec, PeerPools, PeersConnected, Ready, Shutdown, WorkerFailed
from pdcli.workers.layout import WorkerSpec, transfer_pair
from pdcli.workers.mps import start_for
from pdcli.workers.peers import PAIR_TIMEOUT_S
from pdcli.workers.worker import worker_main

logger = logging.getLogger("pdcli.coordinator")

SHUTDOWN_S = 10.0  # a worker still running this long after it was told to stop is killed


def same_gpu(a: WorkerSpec, b: WorkerSpec) -> bool:
    """Workers that hand KV over through CUDA IPC (NCCL cannot pair two ranks on one GPU)."""
    return transfer_pair(a, b) == "gpu-ipc"


def kv_pair(p: WorkerSpec, d: WorkerSpec) -> bool:
    """A pair that hands KV over through a process group of its own (not CUDA IPC on one GPU)."""
    return transfer_pair(p, d) != "gpu-ipc"


@dataclass
class WorkerHandle:
    spec: WorkerSpec
    proc: mp.Process | None  # None: on another node, whose `pdcli node` process owns it
    conn: object
    alive: bool = True
    leaving: bool = False  # its node is leaving: no new requests
    info: Ready | None = None
    inflight: set = field(default_factory=set)  # request ids this worker holds
    # messages to the worker go through a queue and a sender thread, so neither a caller nor the pipe reader
    # ever blocks on a full pipe (a worker blocked on its own sends would otherwise deadlock them)
    outbox: queue.Queue = field(default_factory=queue.Queue)
    last_step_end: float | None = None  # perf_counter when its last StepTokens came


class WorkerPool:
    def __init__(self, model: str, layout: list[WorkerSpec], engine_kwargs: dict, can_pair: Callable | None = None,
                 mps: bool | None = None, startup_timeout: float = 600.0, host: str = "127.0.0.1"):
        """layout: the local workers; can_pair(p, d): p may hand KV to d (the pairs whose process groups are made);
        mps: run workers that share a GPU under CUDA MPS (None: where it can start; see workers/mps.py); host:
        the address the store (and the workers' groups) listen on: the cluster's, else loopback."""
        # the workers' rendezvous store lives here, not in rank 0: a worker that stops first cannot take it down
        # under the others (NCCL's monitor thread then logs connection errors at every shutdown)
        self._store = host_store(host)
        self.host, self.store_addr = host, (host, self._store.port)
        self.can_pair = can_pair or (lambda p, d: False)
        self.workers: list[WorkerHandle] = []
        self.by_rank: dict[int, WorkerHandle] = {}
        self.pairs_ready: set[tuple[int, int]] = set()  # (src, dst) whose group both sides joined
        self._pairs_pending: dict[PairSpec, set[int]] = {}  # pair -> ranks yet to answer
        self._pairs_made: set[tuple[int, int]] = set()
        self._pair_lock = threading.Lock()
        self._pairs_settled = threading.Condition(self._pair_lock)
        self.mps = start_for(layout, mps)
        self.mps_on = self.mps is not None  # workers run under MPS (kept once the daemon stops at shutdown)
        self.closed = False
        self._io_started = False
        try:
            self._spawn(model, layout, engine_kwargs)
            self._wait_ready(startup_timeout)
        except BaseException:
            self.shutdown()
            raise
        self.max_model_len = min((w.info.max_model_len for w in self.workers), default=None)

    def __getitem__(self, rank: int) -> WorkerHandle:
        return self.by_rank[rank]

    def __iter__(self):
        return iter(list(self.workers))

    def live(self, role: str | None = None) -> list[WorkerHandle]:
        return [w for w in list(self.workers) if w.alive and (role is None or w.spec.role == role)]

    def serving(self, role: str | None = None) -> list[WorkerHandle]:
        """Live workers that take new requests (not on a node that is leaving)."""
        return [w for w in self.live(role) if not w.leaving]

    def can_transfer(self, p: WorkerHandle, d: WorkerHandle) -> bool:
        """KV can go from p to d now: through CUDA IPC (d shared its pool), or their pair's group is made."""
        if not kv_pair(p.spec, d.spec):
            return d.info is not None and d.info.kv_ipc is not None
        return (p.spec.rank, d.spec.rank) in self.pairs_ready

    # ---- start ----
    def _spawn(self, model: str, layout: list[WorkerSpec], engine_kwargs: dict) -> None:
        ctx = mp.get_context("spawn")
        for spec in layout:
            parent, child = ctx.Pipe()
            proc = spawn_worker(spec, layout, model, engine_kwargs, child, self.store_addr, self.host, self.mps)
            child.close()
            self._register(WorkerHandle(spec, proc, parent))

    def _register(self, w: WorkerHandle) -> None:
        self.by_rank[w.spec.rank] = w
        self.workers.append(w)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for w in self.workers:
            w.info = wait_ready(w.conn, f"worker {w.spec.role} on {w.spec.device}", deadline, w.proc)
            logger.info("worker %s on %s ready: %d KV blocks, %s attention", w.spec.role, w.spec.device,
                        w.info.num_blocks, w.info.kernel_path)
        self._share_pools(self.workers)

    def _share_pools(self, new: list[WorkerHandle]) -> None:
        """Prefill workers map the pools of the workers on their GPU they hand KV to (CUDA IPC)."""
        for p in self.live("prefill"):
            peers = {d.spec.rank: d.info.kv_ipc for d in self.live() if d.info.kv_ipc is not None
                     and (p in new or d in new) and same_gpu(p.spec, d.spec) and self.can_pair(p.spec, d.spec)}
            if peers and self._io_started:
                self.send(p, PeerPools(peers))
            elif peers:  # at start-up, before the sender threads
                p.conn.send(PeerPools(peers))

    def add_workers(self, handles: list[WorkerHandle]) -> None:
        """Workers that joined from another node (ready, their connections open): served from now on, their
        KV pairs with the others made (`connect_pairs`)."""
        for w in handles:
            self._register(w)
            self._start_sender(w)
        self._share_pools(handles)
        self.connect_pairs()

    # ---- KV pairs ----
    def connect_pairs(self) -> None:
        """Make the process group of every pair of live workers that may hand KV over and has none yet: every
        worker gets the new pairs in one order (so no two wait for each other), answers PeersConnected."""
        live = self.live()
        with self._pair_lock:
            new = [(p.spec.rank, d.spec.rank) for p in live for d in live
                   if self.can_pair(p.spec, d.spec) and kv_pair(p.spec, d.spec)
                   and (p.spec.rank, d.spec.rank) not in self._pairs_made]
            specs = [PairSpec(a, b, f"pdcli/pair/{a}-{b}/") for a, b in sorted(new)]
            for ps in specs:
                self._pairs_made.add((ps.src, ps.dst))
                self._pairs_pending[ps] = {ps.src, ps.dst}
            for rank in sorted({r for ps in specs for r in (ps.src, ps.dst)}):  # queued under the lock: one order
                self.send(self[rank], ConnectPeers([ps for ps in specs if rank in (ps.src, ps.dst)]))

    def _on_peers_connected(self, msg: PeersConnected) -> None:
        with self._pair_lock:
            for ps in msg.connected:
                waiting = self._pairs_pending.get(ps)
                if waiting is not None:
                    waiting.discard(msg.rank)
                    if not waiting:
                        del self._pairs_pending[ps]
                        self.pairs_ready.add((ps.src, ps.dst))
            for ps, err in msg.failed.items():
                logger.warning("no KV pair %d -> %d: %s", ps.src, ps.dst, err)
                self._pairs_pending.pop(ps, None)
            self._pairs_settled.notify_all()

    def _drop_pairs_of(self, rank: int) -> None:
        with self._pair_lock:
            for ps in [ps for ps in self._pairs_pending if rank in (ps.src, ps.dst)]:
                del self._pairs_pending[ps]
            self.pairs_ready -= {k for k in self.pairs_ready if rank in k}
            self._pairs_settled.notify_all()

    def wait_pairs(self, timeout: float = PAIR_TIMEOUT_S + 10) -> None:
        """Until every pair asked for is made or failed (at most `timeout` s)."""
        with self._pair_lock:
            self._pairs_settled.wait_for(lambda: not self._pairs_pending, timeout)

    # ---- connections ----
    def start_io(self, on_message: Callable[[WorkerHandle, object], None],
                 on_death: Callable[[WorkerHandle, str], None]) -> None:
        """A sender thread per worker, and one thread that reads every connection: each message goes to
        on_message, a worker that failed, exited or closed its connection to on_death (once). Then the KV
        pairs of the workers so far are made."""
        self._on_message, self._on_death = on_message, on_death
        for w in self.workers:
            self._start_sender(w)
        self._io_started = True
        self.reader = threading.Thread(target=self._read_loop, name="pdcli-pipes", daemon=True)
        self.reader.start()
        self.connect_pairs()

    def _start_sender(self, w: WorkerHandle) -> None:
        threading.Thread(target=self._send_loop, args=(w,), name=f"pdcli-send-{w.spec.rank}", daemon=True).start()

    def send(self, w: WorkerHandle, msg) -> None:
        w.outbox.put(msg)

    def _send_loop(self, w: WorkerHandle) -> None:
        while True:
            msg = w.outbox.get()
            if msg is None:
                return
            try:
                w.conn.send(msg)
            except (BrokenPipeError, OSError, EOFError):
                if not self.closed:
                    self.died(w, "its connection closed")
                return

    def died(self, w: WorkerHandle, why: str) -> None:
        """w is gone (or fenced off): its requests end through on_death; its pairs are dropped."""
        self._drop_pairs_of(w.spec.rank)
        self._on_death(w, why)

    def lose(self, ranks: set[int], why: str) -> None:
        """Workers of a node that died, hangs or left: connections closed (anything they still send is never
        read: fenced off), requests ended through on_death."""
        for w in self.live():
            if w.spec.rank in ranks:
                self.died(w, why)
                w.outbox.put(None)
                try:
                    w.conn.close()
                except OSError:
                    pass

    def _read_loop(self) -> None:
        last_check = time.monotonic()
        while not self.closed:
            conns = {w.conn: w for w in list(self.workers) if w.alive}
            try:
                ready = wait(list(conns), timeout=0.2)
            except (OSError, ValueError):  # a connection closed under us (lose_node): look again
                continue
            for c in ready:
                self._read(conns[c])
            if time.monotonic() - last_check > 0.5:
                last_check = time.monotonic()
                for w in list(self.workers):
                    if w.alive and w.proc is not None and not w.proc.is_alive() and not self.closed:
                        self.died(w, f"it exited with code {w.proc.exitcode}")

    def _read(self, w: WorkerHandle) -> None:
        try:
            while w.alive and w.conn.poll():
                msg = w.conn.recv()
                if isinstance(msg, WorkerFailed):
                    self.died(w, msg.traceback.strip().splitlines()[-1])
                elif isinstance(msg, PeersConnected):
                    self._on_peers_connected(msg)
                else:
                    self._on_message(w, msg)
        except (EOFError, OSError):
            if not self.closed and w.alive:
                self.died(w, "it exited" if w.proc is not None else "its connection closed")

    # ---- stop ----
    def shutdown(self, timeout: float = SHUTDOWN_S) -> None:
        """Stop every worker, prefill workers first: they map decode workers' pools (CUDA IPC), which must
        outlive the mapping; a worker still alive after `timeout` s is killed; then the MPS daemon. Ctrl-C
        meanwhile kills the workers at once (and is raised again)."""
        self.closed = True
        try:
            self._stop_in_order(time.monotonic() + timeout)
        except KeyboardInterrupt:
            logger.warning("stopping now: workers killed")
            self._kill()
            raise
        finally:
            self._store = None  # every worker has stopped
            if self.mps is not None:
                self.mps.stop()
                self.mps = None

    def _stop_in_order(self, deadline: float) -> None:
        for phase in (("prefill",), ("collocated", "decode")):
            group = [w for w in self.workers if w.spec.role in phase and w.alive]
            for w in group:
                if self._io_started:
                    w.outbox.put(Shutdown())
                    w.outbox.put(None)  # ends the sender thread
                else:  # failed during startup
                    try:
                        w.conn.send(Shutdown())
                    except (BrokenPipeError, OSError):
                        pass
            for w in group:
                if w.proc is None:  # on another node: its node stops it once this head is gone
                    continue
                w.proc.join(max(0.0, deadline - time.monotonic()))
                if w.proc.is_alive():
                    logger.warning("worker %s %d did not stop in time: killed", w.spec.role, w.spec.rank)
                    w.proc.kill()
                    w.proc.join(5)

    def _kill(self) -> None:
        local = [w for w in self.workers if w.proc is not None]
        for w in local:
            if w.proc.is_alive():
                w.proc.kill()
        for w in local:
            w.proc.join(5)


def spawn_worker(spec: WorkerSpec, layout: list[WorkerSpec], model: str, engine_kwargs: dict, conn,
                 store_addr: tuple[str, int], host: str, mps=None) -> mp.Process:
    """Start the process of one of this host's workers (layout: all of them); workers on one GPU split its
    memory; conn: its pipe, or a Dial to the head (a node's worker)."""
    import os

    kwargs = dict(engine_kwargs)
    sharing = sum(s.device == spec.device for s in layout)
    gpu = spec.device.startswith("cuda")
    if gpu and sharing > 1:
        from pdcli.config import CacheConfig

        util = kwargs.get("gpu_memory_utilization") or CacheConfig.gpu_memory_utilization
        kwargs["gpu_memory_utilization"] = util / sharing
    env = mps.env if mps and gpu else {}
    threads = max(1, (os.cpu_count() or 1) // max(1, len(layout)))
    # a tensor-parallel worker starts its follower ranks itself: a daemonic process may not have children
    proc = mp.get_context("spawn").Process(target=worker_main, daemon=spec.tp_size == 1,
                                           name=f"pdcli-{spec.role}-{spec.rank}",
                                           args=(spec, model, kwargs, conn, store_addr, host, threads, env,
                                                 current_level()))
    proc.start()
    return proc


def wait_ready(conn, where: str, deadline: float, proc=None) -> Ready:
    """A starting worker's Ready; an error naming it if it fails, exits or is not ready by `deadline`."""
    while not conn.poll(0.1):
        if proc is not None and not proc.is_alive():
            raise RuntimeError(f"{where} exited during startup")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{where} did not start in time")
    try:
        msg = conn.recv()
    except (EOFError, OSError):
        raise RuntimeError(f"{where} exited during startup") from None
    if isinstance(msg, WorkerFailed):
        raise RuntimeError(f"{where} failed to start:\n{msg.traceback}")
    if not isinstance(msg, Ready):
        raise RuntimeError(f"{where} sent {type(msg).__name__} before Ready")
    return msg
