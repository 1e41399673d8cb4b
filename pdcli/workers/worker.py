"""A worker process: one engine on one device in one role (collocated | prefill | decode), driven by the
coordinator through typed messages (pdcli/messages.py) over a pipe; never KV (workers/kv_transfer.py).
Its loop: handle the messages that came, step the engine, hand finished transfers to their owners, reserve
blocks for the handoffs waiting for them."""
from __future__ import annotations

import logging
import os
import signal
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from pdcli.logger import init_worker_logging
from pdcli.messages import (Abort, ConnectPeers, DropKV, FirstToken, IpcCopyCancelled, IpcCopyDone, PeerPools,
                            PostReceives, Ready, Reserve, SendKV, Shutdown, StatsRequest, StepTokens, Submit,
                            WorkerFailed, WorkerStats, RequestFailed, dispatch)
from pdcli.workers.handoff import HandoffReceiver, HandoffSender
from pdcli.workers.kv_transfer import export_pool
from pdcli.workers.layout import WorkerSpec
from pdcli.workers.peers import PAIR_TIMEOUT_S, Peers
from pdcli.workers.transfers import Transfers

logger = logging.getLogger("pdcli.worker")


def worker_main(spec: WorkerSpec, model: str, engine_kwargs: dict, conn, store_addr: tuple[str, int], host: str,
                threads: int, env: dict | None = None, log_level: int = logging.WARNING) -> None:
    """conn: the pipe to a local coordinator, or a `cluster.transport.Dial` (a worker on another node dials the
    head); store_addr: (host, port) of the coordinator's TCPStore, on which its KV pairs' groups meet; host:
    the address this worker's groups listen on; threads: CPU threads (the node's cores over its workers);
    env: set before CUDA starts here (the MPS daemon's, workers/mps.py)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's: it stops its workers in order
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # so is SIGTERM (a drain), also when sent to the whole group
    os.environ.update(env or {})
    init_worker_logging(log_level, spec)
    try:
        if hasattr(conn, "connect"):
            conn = conn.connect()
        engine, peers = _start(spec, model, engine_kwargs, store_addr, host, threads)
        Worker(spec, engine, conn, peers).run()
    except (KeyboardInterrupt, EOFError, BrokenPipeError, ConnectionError):
        pass
    except Exception:
        logger.exception("worker failed")
        try:
            conn.send(WorkerFailed(traceback.format_exc()))
        except (BrokenPipeError, OSError, AttributeError):
            pass
        raise


def _start(spec: WorkerSpec, model: str, engine_kwargs: dict, store_addr: tuple[str, int], host: str, threads: int):
    """The engine, and a client of the coordinator's store for the KV pairs' groups (made later: ConnectPeers)."""
    if spec.device == "cpu":
        torch.set_num_threads(max(1, threads))
    else:
        torch.cuda.set_device(torch.device(spec.device))
    store = dist.TCPStore(store_addr[0], store_addr[1], is_master=False, timeout=timedelta(seconds=PAIR_TIMEOUT_S))
    from pdcli.config import EngineConfig
    from pdcli.engine.llm_engine import LLMEngine

    if spec.role == "prefill":  # a prefill worker hands each sequence off on its first token
        engine_kwargs = dict(engine_kwargs, async_scheduling=False)
    engine_kwargs = dict(engine_kwargs, tensor_parallel_size=spec.tp_size, tp_devices=spec.tp_devices or None)
    engine = LLMEngine(EngineConfig.from_kwargs(model, device=spec.device, **engine_kwargs))
    engine.detokenize = False  # text is the coordinator's
    engine.report_prefill_progress = True  # partly prefilled prompts' progress goes with each step's tokens
    logger.info("engine ready: %d KV blocks, %s attention", engine.num_blocks, engine.kernel_path)
    mirror = engine.runner.tp_broadcast if engine.followers else None
    return engine, Peers(spec.rank, torch.device(spec.device), store, host, store_addr=store_addr, mirror=mirror)


IDLE_POLL_S = 0.02  # an idle worker waits this long for a message before it polls its transfers again


class Worker:
    def __init__(self, spec: WorkerSpec, engine, conn, peers: Peers | None = None):
        self.spec, self.engine, self.conn = spec, engine, conn
        self.received: dict[str, float] = {}  # request id -> perf_counter when its Submit came, till its first token
        self.peers = peers or Peers(spec.rank, torch.device(spec.device))
        groups = self.peers.groups  # (sender rank, receiver rank) -> the pair's process group, as pairs are made
        self.transfers = Transfers(engine.kv_cache)
        self.sender = HandoffSender(engine, spec.rank, conn.send, self.transfers, groups)
        self.receiver = HandoffReceiver(engine, spec.rank, conn.send, self.transfers, groups)
        r, s = self.receiver, self.sender
        self.handlers = {
            Submit: self.on_submit, Reserve: r.on_reserve, SendKV: s.on_send_kv, PostReceives: r.on_post_receives,
            FirstToken: r.on_first_token, IpcCopyDone: lambda m: r.on_copy_done(m.request_id, m.nbytes),
            IpcCopyCancelled: lambda m: r.on_copy_done(m.request_id, None),
            PeerPools: lambda m: s.peer_handles.update(m.handles),
            ConnectPeers: lambda m: conn.send(self.peers.connect(m)), DropKV: self.on_drop, Abort: self.on_abort,
            StatsRequest: lambda m: conn.send(self.stats()), Shutdown: lambda m: False,
        }

    def run(self) -> None:
        e = self.engine
        # a pool that prefill workers on this GPU may copy into (CUDA IPC): a decode worker's, or a collocated one's
        # (which only a prefill worker beside it uses: if torch cannot share it, the handoff path is off, not the worker)
        ipc = None
        if self.spec.role != "prefill" and e.kv_cache.is_cuda:
            try:
                ipc = export_pool(e.kv_cache)
            except RuntimeError as err:
                if self.spec.role == "decode":
                    raise
                logger.warning("KV pool not shared through CUDA IPC (%s): no handoffs into this worker", err)
        self.conn.send(Ready(self.spec.rank, self.spec.role, self.spec.device, e.num_blocks, e.kernel_path,
                             e.max_model_len, ipc))
        while True:
            busy = e.has_unfinished_requests() or self.sender.busy or self.receiver.busy
            if not self.drain_messages(0.0 if busy else IDLE_POLL_S):
                self.close()
                return
            if e.has_unfinished_requests():
                self.step()
            self.transfers.poll()
            self.receiver.try_reserve()

    def drain_messages(self, timeout: float) -> bool:
        """Handle every message that has arrived, waiting up to `timeout` s for the first only: a request that
        arrives at an idle worker is stepped at once, not after the messages that follow it. False: shut down."""
        while self.conn.poll(timeout):
            if not self.handle(self.conn.recv()):
                return False
            timeout = 0.0
        return True

    def handle(self, msg) -> bool:
        """False: shut down."""
        return dispatch(self.handlers, msg, f"{self.spec.role} worker {self.spec.rank}") is not False

    def close(self) -> None:
        self.transfers.synchronize()
        self.sender.close()
        self.engine.close()  # its tensor-parallel followers, if any
        if self.engine.kv_cache.is_cuda:
            torch.cuda.synchronize()
            torch.cuda.ipc_collect()

    def on_submit(self, msg: Submit) -> None:
        self.received[msg.request_id] = time.perf_counter()
        try:
            self.engine.add_request(msg.prompt_ids, msg.params, request_id=msg.request_id, seed=msg.seed,
                                    handoff=msg.handoff)
        except ValueError as err:
            self.received.pop(msg.request_id, None)
            self.conn.send(RequestFailed(msg.request_id, str(err)))

    def on_drop(self, msg: DropKV) -> None:
        self.received.pop(msg.request_id, None)
        self.sender.forget(msg.request_id)
        self.engine.release(msg.request_id)

    def on_abort(self, msg: Abort) -> None:
        rid = msg.request_id
        self.received.pop(rid, None)
        self.engine.abort_request(rid)
        self.sender.forget(rid)
        if not self.receiver.abort(rid, msg.wait_for_ipc_copy):  # else freed once the copy into them ends
            self.engine.release(rid)

    def step(self) -> None:
        """One engine step; one message with its tokens and the prompt progress the device has finished (it marks
        a step's end for the router), not one per sequence: the coordinator shares its process with the server. A
        step that only prefilled part of a prompt and is still on the device sends nothing (its end is not known)."""
        deltas = self.engine.step()
        progress = self.engine.take_prefill_progress()
        if deltas or progress:  # a step still running on the device (part of a prompt) says nothing yet
            logprobs = [d.logprobs for d in deltas] if any(d.logprobs is not None for d in deltas) else None
            received = [m for r in list(self.received) if (m := self._first_token_marks(r)) is not None]
            self.conn.send(StepTokens([d.request_id for d in deltas], [d.index for d in deltas],
                                      [d.token_ids for d in deltas],
                                      [d.finish_reason if d.finished else None for d in deltas], logprobs,
                                      progress or None, received or None))
        finished = [d.request_id for d in deltas if d.finished and self.engine.pop_if_finished(d.request_id)]
        self.sender.after_step(finished)

    def _first_token_marks(self, rid: str) -> tuple[str, float, float | None, float] | None:
        """For a prompt in flight here whose first token has landed (its entry in self.received taken): (request id,
        when its Submit came, when the launch of a step with its first prompt tokens began, when the step with its
        first token landed on the host), perf_counter s; None while it has none."""
        req = self.engine.requests.get(rid)
        seq = req.seqs[0] if req is not None and req.seqs else None
        if seq is None or seq.first_token_time is None:
            return None
        return rid, self.received.pop(rid), seq.first_launch_time, seq.first_token_time

    def stats(self) -> WorkerStats:
        return WorkerStats(rank=self.spec.rank, role=self.spec.role, **self.engine.stats())
