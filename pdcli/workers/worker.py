"""A worker process: one engine on one device in one role, driven by the coordinator over a pipe.

Protocol (tuples over a multiprocessing Pipe; never KV):
  coordinator -> worker: ("add", rid, prompt_ids, params, seed, handoff)  run, or (handoff) prefill only
                         ("reserve", rid, prompt_ids, params, seed, ipc)  decode: blocks for rid's prompt KV, now
                         ("dest", rid, dst, tag, dst_blocks | None, layerwise)  prefill: where rid's KV goes
                                      (dst_blocks: the decode worker's blocks, to copy into through CUDA IPC)
                         ("recv", src, [(rid, num_blocks, tag)], layerwise)  decode: post the receives of a group
                                      of sends that prefill worker src announced, in its order
                         ("first", rid, token)   decode: the first token, sampled by the prefill worker
                         ("ipc_done", rid, nbytes)   decode: the IPC copy into rid's blocks has finished
                         ("peers", {rank: ipc handle})   ("drop", rid)   ("abort", rid, release_now)
                         ("stats",)    ("shutdown",)
  worker -> coordinator: ("ready", info)  ("tokens", [(rid, index, ids, finish_reason | None)])  one per step
                         ("prefilled", rid, first_token, num_blocks)   ("reserved", rid, blocks | None)
                         ("sending", dst, [(rid, num_blocks, tag)], layerwise)  before its sends are matched
                         ("sent", rid, nbytes, seconds, ipc_peer | None, kind)   ("received", rid, nbytes)
                         ("error", rid, message)   ("stats", dict)
"""
from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from datetime import timedelta
from collections import deque

import torch
import torch.distributed as dist

from pdcli.workers.kv_transfer import (LayerSender, copy_kv_ipc, export_pool, import_pool, recv_kv, scatter_blocks,
                                       send_kv, wait_done)
from pdcli.workers.layout import WorkerSpec


def connect_peers(rank: int, pairs: list[tuple[int, int]], device: torch.device) -> dict[tuple[int, int], object]:
    """A communicator for each (sender, receiver) pair of workers on different GPUs, set up now. One per
    direction: NCCL runs a communicator's operations in order on one stream, so two workers sending to each
    other through one would each wait in its send for a receive queued behind the other's send. Set up
    lazily, the first receive would block in the setup until its sender's first send, which waits for that
    very receive. Every rank creates every group, in one order, so no two workers wait for each other."""
    groups = {}
    x = torch.zeros(1, device=device)
    for a, b in sorted(set(pairs)):
        g = dist.new_group([a, b])
        if rank in (a, b):
            groups[(a, b)] = g
        if rank == a:
            dist.send(x, b, group=g)
        elif rank == b:
            dist.recv(x, a, group=g)
    torch.cuda.synchronize(device)
    return groups


def worker_main(spec: WorkerSpec, model: str, engine_kwargs: dict, conn, dist_init: tuple[str, int],
                layout: list[WorkerSpec], nccl_pairs: list[tuple[int, int]], env: dict | None = None) -> None:
    """dist_init: (host, port) of the coordinator's TCPStore; nccl_pairs: the (prefill, decode) ranks that
    may hand KV over through NCCL; env: set before CUDA starts here (the MPS daemon's, workers/mps.py)."""
    os.environ.update(env or {})
    try:
        if spec.device == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, len(layout))))
        else:
            torch.cuda.set_device(torch.device(spec.device))
        backend = "gloo" if spec.device == "cpu" else "nccl"
        store = dist.TCPStore(dist_init[0], dist_init[1], is_master=False, timeout=timedelta(seconds=300))
        dist.init_process_group(backend, store=store, rank=spec.rank, world_size=len(layout))
        groups = connect_peers(spec.rank, nccl_pairs, torch.device(spec.device)) if backend == "nccl" else {}
        from pdcli.config import EngineConfig
        from pdcli.engine.llm_engine import LLMEngine

        engine = LLMEngine(EngineConfig.from_kwargs(model, device=spec.device, **engine_kwargs))
        engine.detokenize = False
        engine.async_scheduling = spec.role != "prefill"  # a prefill worker hands each sequence off on its first token
        Worker(spec, engine, conn, groups).run()
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        pass
    except Exception:
        try:
            conn.send(("fatal", traceback.format_exc()))
        except (BrokenPipeError, OSError):
            pass
        raise
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a dead peer can make teardown fail; the process exits anyway
                pass


IDLE_POLL_S = 0.02  # an idle worker waits this long for a message before it polls its transfers again


class Worker:
    def __init__(self, spec: WorkerSpec, engine, conn, groups: dict | None = None):
        self.spec, self.engine, self.conn = spec, engine, conn
        self.groups = groups or {}  # (sender rank, receiver rank) -> its process group (NCCL); else the default
        kv = engine.runner.kv_cache
        self.side_stream = torch.cuda.Stream(kv.device) if kv.is_cuda else None  # gathers, sends, receives
        self.sends: list = []  # PendingTransfer, prefill role
        self.recvs: list = []  # PendingTransfer, decode role
        self.dests: dict[str, tuple] = {}  # prefill: rid -> (dst rank, tag, dst blocks | None, layerwise)
        self.sent_early: set[str] = set()  # prefill: sent before the first token landed: released at detach
        self.new_sends: list = []  # prefill: layer-wise sends posted in the step being launched
        self.announced: list = []  # prefill: (rid, dst, tag, blocks) of whole sends announced at launch
        self.timing_streams: dict[int, torch.cuda.Stream] = {}  # per peer rank, for mark_done
        self.waiting_reserve: deque = deque()  # reserve messages waiting for free blocks
        self.landed: dict[str, int] = {}  # decode: rid -> bytes of KV now in its blocks
        self.firsts: dict[str, int] = {}  # decode: rid -> first token
        self.started: dict[str, float] = {}
        self.peer_handles: dict[int, tuple] = {}  # decode rank -> IPC handle of its pool (same GPU)
        self.peer_pools: dict[int, torch.Tensor] = {}
        self.ipc_reserved: set[str] = set()  # decode role: blocks reserved for an IPC copy not yet done
        self.ipc_aborted: set[str] = set()  # ... of which aborted: released when the copy is done
        # one thread per peer waits for its transfers in issue order (a dead peer stalls only its own)
        self.waiters: dict[int, queue.Queue] = {}
        self.completed: queue.Queue = queue.Queue()
        engine.runner.kv_sender = self.layer_sender  # any worker can be asked to prefill for another

    def waiter(self, peer: int) -> queue.Queue:
        q = self.waiters.get(peer)
        if q is None:
            q = self.waiters[peer] = queue.Queue()
            threading.Thread(target=self._wait_loop, args=(q,), name=f"pdcli-kv-wait-{peer}", daemon=True).start()
        return q

    def _wait_loop(self, q: queue.Queue) -> None:
        kv = self.engine.runner.kv_cache
        stream = None
        if kv.is_cuda:
            torch.cuda.set_device(kv.device)
            stream = torch.cuda.Stream(kv.device)
        while True:
            t = q.get()
            try:
                seconds = wait_done(t, stream)
                self.completed.put((t, None, seconds, time.perf_counter()))
            except Exception as err:  # a dead peer
                self.completed.put((t, str(err), None, time.perf_counter()))

    def run(self) -> None:
        e = self.engine
        ipc = export_pool(e.runner.kv_cache) if self.spec.role == "decode" and e.runner.kv_cache.is_cuda else None
        self.conn.send(("ready", dict(rank=self.spec.rank, role=self.spec.role, device=self.spec.device,
                                      num_blocks=e.runner.num_blocks, kernel_path=e.runner.kernel_path,
                                      max_model_len=e.max_model_len, kv_ipc=ipc)))
        while True:
            busy = e.has_unfinished_requests() or self.sends or self.recvs or self.waiting_reserve
            if not self.drain_messages(0.0 if busy else IDLE_POLL_S):
                self.close()
                return
            if e.has_unfinished_requests():
                self.step()
            self.poll_transfers()
            self.try_reserve()

    def drain_messages(self, timeout: float) -> bool:
        """Handle every message that has arrived, waiting up to `timeout` s for the first only: a request that
        arrives at an idle worker is stepped at once, not after the messages that follow it. False: shut down."""
        while self.conn.poll(timeout):
            if not self.handle(self.conn.recv()):
                return False
            timeout = 0.0
        return True

    def close(self) -> None:
        """Release the peer pools mapped through CUDA IPC before the process ends: a mapping never released
        keeps the exporting worker's reference count up (torch warns at its exit)."""
        if self.side_stream is not None:
            self.side_stream.synchronize()
        self.peer_pools.clear()
        if self.engine.runner.kv_cache.is_cuda:
            torch.cuda.synchronize()
            torch.cuda.ipc_collect()

    def handle(self, msg) -> bool:
        kind, e = msg[0], self.engine
        if kind == "add":
            _, rid, prompt, params, seed, handoff = msg
            try:
                e.add_request(prompt, params, request_id=rid, seed=seed, handoff=handoff)
            except ValueError as err:
                self.conn.send(("error", rid, str(err)))
        elif kind == "reserve":
            self.waiting_reserve.append(msg)
        elif kind == "dest":
            _, rid, dst, tag, dst_blocks, layerwise = msg
            self.dests[rid] = (dst, tag, dst_blocks, layerwise)
            if rid in e.handoff:  # prefilled already: send all layers now
                self.start_send(rid)
            elif rid not in e.requests:  # finished (or aborted) before its handoff
                self.forget_dest(rid)
        elif kind == "recv":
            _, src, items, layerwise = msg
            for t in recv_kv(e.runner.kv_cache, items, src, layerwise, self.side_stream, self.timing(src),
                             self.groups.get((src, self.spec.rank))):
                self.started[t.request_id] = time.perf_counter()
                self.recvs.append(t)
                self.waiter(src).put(t)
        elif kind == "first":
            self.firsts[msg[1]] = msg[2]
            self.maybe_admit(msg[1])
        elif kind == "ipc_done":  # the prefill worker's copy into our reserved blocks has finished
            _, rid, nbytes = msg
            self.ipc_reserved.discard(rid)
            if rid in self.ipc_aborted:
                self.ipc_aborted.discard(rid)
                e.release(rid)
            elif rid in e.handoff:
                self.landed[rid] = nbytes
                self.maybe_admit(rid)
        elif kind == "peers":
            self.peer_handles.update(msg[1])
        elif kind == "drop":
            self.forget_dest(msg[1])
            self.sent_early.discard(msg[1])
            e.release(msg[1])
        elif kind == "abort":
            rid, release_now = msg[1], msg[2]
            e.abort_request(rid)
            self.forget_dest(rid)
            self.sent_early.discard(rid)
            if rid in self.ipc_reserved and not release_now:
                self.ipc_aborted.add(rid)  # a copy into these blocks may be running: free them once it is done
            else:
                self.ipc_reserved.discard(rid)
                e.release(rid)
            self.landed.pop(rid, None)
            self.firsts.pop(rid, None)
            self.waiting_reserve = deque(m for m in self.waiting_reserve if m[1] != rid)
            self.recvs = [t for t in self.recvs if t.request_id != rid]  # landing nowhere (a dead sender's: never)
        elif kind == "stats":
            self.conn.send(("stats", self.stats()))
        elif kind == "shutdown":
            return False
        return True

    def timing(self, peer: int) -> torch.cuda.Stream | None:
        if self.side_stream is None:
            return None
        if peer not in self.timing_streams:
            self.timing_streams[peer] = torch.cuda.Stream(self.side_stream.device)
        return self.timing_streams[peer]

    # ---- prefill role: sends ----
    def forget_dest(self, rid: str) -> None:
        dest = self.dests.pop(rid, None)
        if dest is not None and dest[2] is not None:  # an IPC copy never to be posted: the decode worker
            self.conn.send(("sent", rid, 0, 0.0, dest[0], "ipc"))  # frees the blocks it kept for it

    def track_send(self, t) -> None:
        """A posted send (or IPC copy): its waiter thread reports it done."""
        self.sends.append(t)
        self.waiter(t.peer).put(t)

    def send_whole(self, rid: str, blocks: list[int], dst: int, tag: int) -> None:
        self.track_send(send_kv(self.engine.runner.kv_cache, blocks, dst, tag, rid, self.side_stream, self.timing(dst),
                                self.groups.get((self.spec.rank, dst))))

    def layer_sender(self, seqs: list, lens: list[int]) -> LayerSender | None:
        """At the launch of an eager step, for the sequences whose last prefill chunk it runs and whose
        decode worker (not on this GPU) has reserved blocks already: sends announced now, so the receives
        are posted before the data is ready; layer by layer during the forward (returned), or all layers
        right after the step (`announced`)."""
        layers, whole = [], []
        for seq, n in zip(seqs, lens):
            rid = seq.request_id
            d = self.dests.get(rid)
            if (d is not None and d[2] is None and seq.num_output_tokens == 0
                    and seq.num_computed_tokens + n == len(seq) and seq.params.max_tokens > 1):
                (layers if d[3] else whole).append((rid, list(seq.block_table), d[0], d[1]))
                self.dests.pop(rid)
                self.started[rid] = time.perf_counter()
        for group, layerwise in ((layers, True), (whole, False)):  # the order the sends are posted in
            for dst in dict.fromkeys(d for _, _, d, _ in group):
                self.conn.send(("sending", dst, [(rid, len(b), tag) for rid, b, d, tag in group if d == dst],
                                layerwise))
        self.announced.extend(whole)
        if not layers:
            return None
        dsts = {dst for _, _, dst, _ in layers}
        sender = LayerSender(self.engine.runner.kv_cache, layers, self.side_stream, {d: self.timing(d) for d in dsts},
                             {d: self.groups.get((self.spec.rank, d)) for d in dsts})
        self.new_sends.extend(sender.transfers)
        return sender

    def start_send(self, rid: str) -> None:
        """All layers of a prefilled sequence (in handoff) at once."""
        e = self.engine
        seq = e.handoff[rid]
        dst, tag, dst_blocks, _ = self.dests.pop(rid)
        self.started[rid] = time.perf_counter()
        if dst_blocks is not None:
            if dst not in self.peer_pools:
                self.peer_pools[dst] = import_pool(self.peer_handles[dst])
            self.track_send(copy_kv_ipc(e.runner.kv_cache, seq.block_table, self.peer_pools[dst], dst_blocks, dst, rid,
                                        self.side_stream))
        else:
            self.conn.send(("sending", dst, [(rid, len(seq.block_table), tag)], False))
            self.send_whole(rid, seq.block_table, dst, tag)

    def step(self) -> None:
        e = self.engine
        deltas = e.step()
        # one message per step (also when no token landed: it marks the step's end for the router), not per
        # sequence: the coordinator shares its process with the server
        self.conn.send(("tokens", [(d.request_id, d.index, d.token_ids, d.finish_reason if d.finished else None)
                                   for d in deltas]))
        for d in deltas:
            if d.finished and d.request_id in e.requests and e.requests[d.request_id].finished:
                e.pop_finished(d.request_id)
                self.forget_dest(d.request_id)  # a prefill worker's sequence that ended on its first token
                self.sent_early.discard(d.request_id)
        # handoffs (a prefill worker's requests; a collocated worker's when asked to prefill for another)
        for t in self.new_sends:  # every layer is posted now
            self.track_send(t)
        self.new_sends = []
        # sends announced at launch, in announced order, before any other: also those of sequences that
        # ended on their first token, since their receives are posted (their blocks are read as they are)
        for rid, blocks, dst, tag in self.announced:
            self.send_whole(rid, blocks, dst, tag)
        self.announced = []
        for seq in e.detach_prefilled():
            self.conn.send(("prefilled", seq.request_id, seq.token_ids[-1], len(seq.block_table)))
            if seq.request_id in self.dests:
                self.start_send(seq.request_id)
            elif seq.request_id in self.sent_early:
                self.sent_early.discard(seq.request_id)
                e.release(seq.request_id)

    # ---- decode role: reservations and receives ----
    def try_reserve(self) -> None:
        e = self.engine
        while self.waiting_reserve:
            _, rid, prompt, params, seed, ipc = self.waiting_reserve[0]
            blocks = e.reserve(rid, prompt, params, seed)
            if blocks is None:
                return  # FCFS: wait for blocks to free up
            self.waiting_reserve.popleft()
            if ipc:  # the prefill worker on this GPU copies straight into these blocks
                self.ipc_reserved.add(rid)
            self.conn.send(("reserved", rid, list(blocks) if ipc else None))

    def maybe_admit(self, rid: str) -> None:
        if rid in self.engine.handoff and rid in self.landed and rid in self.firsts:
            self.engine.admit(rid, self.firsts.pop(rid))
            self.conn.send(("received", rid, self.landed.pop(rid)))

    def poll_transfers(self) -> None:
        e = self.engine
        while True:
            try:
                t, err, seconds, finished = self.completed.get_nowait()
            except queue.Empty:
                return
            posted = self.started.pop(t.request_id, finished)
            seconds = finished - posted if seconds is None else seconds
            if t in self.sends:
                self.sends.remove(t)
                if t.request_id in e.handoff or t.request_id not in e.requests:
                    e.release(t.request_id)
                else:  # layer-wise sends done while the step that samples its first token is in flight
                    self.sent_early.add(t.request_id)
                self.conn.send(("error", t.request_id, f"KV send failed: {err}") if err else
                               ("sent", t.request_id, t.nbytes, seconds, t.peer if t.kind == "ipc" else None, t.kind))
            elif t in self.recvs:
                self.recvs.remove(t)
                seq = e.handoff.get(t.request_id)
                if seq is None:
                    continue  # aborted meanwhile: the KV is dropped
                if err:
                    e.release(t.request_id)
                    self.conn.send(("error", t.request_id, f"KV receive failed: {err}"))
                elif t.bufs[0].shape[2] != len(seq.block_table):
                    e.release(t.request_id)
                    self.conn.send(("error", t.request_id, f"KV of {t.bufs[0].shape[2]} blocks for "
                                                           f"{len(seq.block_table)} reserved ones"))
                else:
                    buf = t.bufs[0]
                    if buf.is_cuda:
                        buf.record_stream(torch.cuda.current_stream(buf.device))  # allocated on the side stream
                    scatter_blocks(e.runner.kv_cache, seq.block_table, buf)
                    self.landed[t.request_id] = t.nbytes
                    self.maybe_admit(t.request_id)

    def stats(self) -> dict:
        e = self.engine
        return dict(rank=self.spec.rank, role=self.spec.role, num_blocks=e.runner.num_blocks,
                    num_free_blocks=e.num_free_blocks(), running=len(e.scheduler.running),
                    waiting=len(e.scheduler.waiting), handoff=len(e.handoff),
                    queued_prefill_tokens=sum(len(s) - s.num_computed_tokens for s in e.scheduler.waiting))
