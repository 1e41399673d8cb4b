"""The worker processes of a coordinator: start (one per (device, role), their rendezvous store, MPS for
workers sharing a GPU), the pipes (a sender thread per worker, one thread reading them all), death
detection, and stop."""
from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Callable

from pdcli.logger import current_level
from pdcli.messages import PeerPools, Ready, Shutdown, WorkerFailed
from pdcli.workers.layout import WorkerSpec, transfer_pair
from pdcli.workers.mps import start_for
from pdcli.workers.worker import worker_main

logger = logging.getLogger("pdcli.coordinator")

SHUTDOWN_S = 10.0  # a worker still running this long after it was told to stop is killed


def loopback_listener() -> int:
    """A listening socket on 127.0.0.1 for the store (TCPStore binds every interface, unauthenticated);
    its descriptor is handed over, the store owns it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock.detach()


def same_gpu(a: WorkerSpec, b: WorkerSpec) -> bool:
    """Workers that hand KV over through CUDA IPC (NCCL cannot pair two ranks on one GPU)."""
    return transfer_pair(a, b) == "gpu-ipc"


@dataclass
class WorkerHandle:
    spec: WorkerSpec
    proc: mp.Process
    conn: object
    alive: bool = True
    info: Ready | None = None
    inflight: set = field(default_factory=set)  # request ids this worker holds
    # messages to the worker go through a queue and a sender thread, so neither a caller nor the pipe reader
    # ever blocks on a full pipe (a worker blocked on its own sends would otherwise deadlock them)
    outbox: queue.Queue = field(default_factory=queue.Queue)
    last_step_end: float | None = None  # perf_counter when its last StepTokens came


class WorkerPool:
    def __init__(self, model: str, layout: list[WorkerSpec], engine_kwargs: dict, nccl_pairs: list[tuple[int, int]],
                 mps: bool | None = None, startup_timeout: float = 600.0):
        """nccl_pairs: the (prefill, decode) ranks that hand KV over through NCCL; mps: run workers that share a
        GPU under CUDA MPS (None: where it can start; see workers/mps.py)."""
        import torch.distributed as dist

        # the workers' rendezvous store lives here, not in rank 0: a worker that stops first cannot take it down
        # under the others (NCCL's monitor thread then logs connection errors at every shutdown)
        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                    master_listen_fd=loopback_listener())
        self.workers: list[WorkerHandle] = []
        self.mps = start_for(layout, mps)
        self.mps_on = self.mps is not None  # workers run under MPS (kept once the daemon stops at shutdown)
        self.closed = False
        self._io_started = False
        try:
            self._spawn(model, layout, engine_kwargs, ("127.0.0.1", self._store.port), nccl_pairs)
            self._wait_ready(startup_timeout)
        except BaseException:
            self.shutdown()
            raise
        self.max_model_len = min(w.info.max_model_len for w in self.workers)

    def __getitem__(self, rank: int) -> WorkerHandle:
        return self.workers[rank]

    def __iter__(self):
        return iter(self.workers)

    def live(self, role: str | None = None) -> list[WorkerHandle]:
        return [w for w in self.workers if w.alive and (role is None or w.spec.role == role)]

    # ---- start ----
    def _spawn(self, model: str, layout: list[WorkerSpec], engine_kwargs: dict, init: tuple[str, int],
               nccl_pairs: list[tuple[int, int]]) -> None:
        ctx = mp.get_context("spawn")
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
            proc = ctx.Process(target=worker_main, daemon=True, name=f"pdcli-{spec.role}-{spec.rank}",
                               args=(spec, model, kwargs, child, init, list(layout), nccl_pairs, env, current_level()))
            proc.start()
            child.close()
            self.workers.append(WorkerHandle(spec, proc, parent))

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for w in self.workers:
            where = f"worker {w.spec.role} on {w.spec.device}"
            while not w.conn.poll(0.1):
                if not w.proc.is_alive():
                    raise RuntimeError(f"{where} exited during startup")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{where} did not start in {timeout:.0f} s")
            try:
                msg = w.conn.recv()
            except EOFError:
                raise RuntimeError(f"{where} exited during startup") from None
            if isinstance(msg, WorkerFailed):
                raise RuntimeError(f"{where} failed to start:\n{msg.traceback}")
            if not isinstance(msg, Ready):
                raise RuntimeError(f"{where} sent {type(msg).__name__} before Ready")
            w.info = msg
            logger.info("%s ready: %d KV blocks, %s attention", where, msg.num_blocks, msg.kernel_path)
        for p in self.live("prefill"):
            peers = {d.spec.rank: d.info.kv_ipc for d in self.live("decode") if same_gpu(p.spec, d.spec)}
            if peers:
                p.conn.send(PeerPools(peers))

    # ---- pipes ----
    def start_io(self, on_message: Callable[[WorkerHandle, object], None],
                 on_death: Callable[[WorkerHandle, str], None]) -> None:
        """A sender thread per worker, and one thread that reads every pipe: each message goes to on_message,
        a worker that failed, exited or closed its pipe to on_death (once)."""
        self._on_message, self._on_death = on_message, on_death
        for w in self.workers:
            threading.Thread(target=self._send_loop, args=(w,), name=f"pdcli-send-{w.spec.rank}", daemon=True).start()
        self._io_started = True
        self.reader = threading.Thread(target=self._read_loop, name="pdcli-pipes", daemon=True)
        self.reader.start()

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
                    self._on_death(w, "its pipe closed")
                return

    def _read_loop(self) -> None:
        conns = {w.conn: w for w in self.workers}
        last_check = time.monotonic()
        while not self.closed:
            for c in wait([c for c, w in conns.items() if w.alive], timeout=0.2):
                w = conns[c]
                try:
                    while c.poll():
                        msg = c.recv()
                        if isinstance(msg, WorkerFailed):
                            self._on_death(w, msg.traceback.strip().splitlines()[-1])
                        else:
                            self._on_message(w, msg)
                except (EOFError, OSError):
                    if not self.closed:
                        self._on_death(w, "it exited")
            if time.monotonic() - last_check > 0.5:
                last_check = time.monotonic()
                for w in self.workers:
                    if w.alive and not w.proc.is_alive() and not self.closed:
                        self._on_death(w, f"it exited with code {w.proc.exitcode}")

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
            group = [w for w in self.workers if w.spec.role in phase]
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
                w.proc.join(max(0.0, deadline - time.monotonic()))
                if w.proc.is_alive():
                    logger.warning("worker %s %d did not stop in time: killed", w.spec.role, w.spec.rank)
                    w.proc.kill()
                    w.proc.join(5)

    def _kill(self) -> None:
        for w in self.workers:
            if w.proc.is_alive():
                w.proc.kill()
        for w in self.workers:
            w.proc.join(5)
