"""A worker process: one engine on one device in one role, driven by the coordinator over a pipe.

Protocol (tuples over a multiprocessing Pipe; never KV):
  coordinator -> worker: ("add", rid, prompt_ids, params, seed)      run (collocated) or prefill (prefill role)
                         ("reserve", rid, prompt_ids, first, params, seed, src, tag)  decode role: take a handoff
                         ("send", rid, dst, tag)                       prefill role: ship rid's KV to rank dst
                         ("drop", rid)    ("abort", rid)    ("stats",)    ("shutdown",)
  worker -> coordinator: ("ready", info)  ("tokens", rid, index, ids, finish_reason | None)
                         ("prefilled", rid, first_token, num_blocks)   ("reserved", rid)
                         ("sent", rid, nbytes, seconds)   ("received", rid, nbytes, seconds)
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

from pdcli.workers.kv_transfer import copy_kv_ipc, export_pool, import_pool, recv_kv, scatter_blocks, send_kv
from pdcli.workers.layout import WorkerSpec


def worker_main(spec: WorkerSpec, model: str, engine_kwargs: dict, conn, dist_init: tuple[str, int],
                world_size: int) -> None:
    """dist_init: (host, port) of the coordinator's TCPStore."""
    try:
        if spec.device == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world_size)))
        else:
            torch.cuda.set_device(torch.device(spec.device))
        backend = "gloo" if spec.device == "cpu" else "nccl"
        store = dist.TCPStore(dist_init[0], dist_init[1], is_master=False, timeout=timedelta(seconds=300))
        dist.init_process_group(backend, store=store, rank=spec.rank, world_size=world_size)
        from pdcli.config import EngineConfig
        from pdcli.engine.llm_engine import LLMEngine

        engine = LLMEngine(EngineConfig.from_kwargs(model, device=spec.device, **engine_kwargs))
        engine.detokenize = False
        engine.async_scheduling = spec.role != "prefill"  # a prefill worker hands each sequence off on its first token
        Worker(spec, engine, conn).run()
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


class Worker:
    def __init__(self, spec: WorkerSpec, engine, conn):
        self.spec, self.engine, self.conn = spec, engine, conn
        self.sends: list = []  # PendingTransfer, prefill role
        self.recvs: list = []  # PendingTransfer, decode role
        self.waiting_reserve: deque = deque()  # reserve messages waiting for free blocks
        self.started: dict[str, float] = {}
        self.peer_handles: dict[int, tuple] = {}  # decode rank -> IPC handle of its pool (same GPU)
        self.peer_pools: dict[int, torch.Tensor] = {}
        self.copy_stream: torch.cuda.Stream | None = None  # IPC copies, beside the compute stream
        self.ipc_reserved: set[str] = set()  # decode role: blocks reserved for an IPC copy not yet done
        self.ipc_aborted: set[str] = set()  # ... of which aborted: released when the copy is done
        # gloo's p2p work reports completion only through wait(): a thread waits, in issue order
        self.to_wait: queue.Queue = queue.Queue()
        self.completed: queue.Queue = queue.Queue()
        threading.Thread(target=self._wait_loop, name="pdcli-kv-wait", daemon=True).start()

    def _wait_loop(self) -> None:
        while True:
            t = self.to_wait.get()
            try:
                t.work.wait()
                if t.buf.is_cuda and t.peer is None:
                    torch.cuda.current_stream(t.buf.device).synchronize()
                self.completed.put((t, None, time.perf_counter()))
            except Exception as err:  # a dead peer
                self.completed.put((t, str(err), time.perf_counter()))

    def run(self) -> None:
        e = self.engine
        ipc = export_pool(e.runner.kv_cache) if self.spec.role == "decode" and e.runner.kv_cache.is_cuda else None
        self.conn.send(("ready", dict(rank=self.spec.rank, role=self.spec.role, device=self.spec.device,
                                      num_blocks=e.runner.num_blocks, kernel_path=e.runner.kernel_path,
                                      max_model_len=e.max_model_len, kv_ipc=ipc)))
        while True:
            busy = e.has_unfinished_requests() or self.sends or self.recvs or self.waiting_reserve
            while self.conn.poll(0 if busy else 0.02):
                if not self.handle(self.conn.recv()):
                    self.close()
                    return
            if e.has_unfinished_requests():
                self.step()
            self.poll_transfers()
            self.try_reserve()

    def close(self) -> None:
        """Release the peer pools mapped through CUDA IPC before the process ends: a mapping never released
        keeps the exporting worker's reference count up (torch warns at its exit)."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        self.peer_pools.clear()
        if self.engine.runner.kv_cache.is_cuda:
            torch.cuda.synchronize()
            torch.cuda.ipc_collect()

    def handle(self, msg) -> bool:
        kind, e = msg[0], self.engine
        if kind == "add":
            _, rid, prompt, params, seed = msg
            try:
                e.add_request(prompt, params, request_id=rid, seed=seed)
            except ValueError as err:
                self.conn.send(("error", rid, str(err)))
        elif kind == "reserve":
            self.waiting_reserve.append(msg)
        elif kind in ("send", "send_ipc"):  # send: (rid, dst rank, tag); send_ipc: (rid, dst rank, its blocks)
            rid, dst = msg[1], msg[2]
            seq = e.handoff.get(rid)
            if seq is None:
                self.conn.send(("error", rid, "no prefilled KV to send"))
            else:
                self.started[rid] = time.perf_counter()
                if kind == "send":
                    t = send_kv(e.runner.kv_cache, seq.block_table, dst, msg[3], rid)
                else:
                    if dst not in self.peer_pools:
                        self.peer_pools[dst] = import_pool(self.peer_handles[dst])
                        self.copy_stream = self.copy_stream or torch.cuda.Stream(e.runner.kv_cache.device)
                    t = copy_kv_ipc(e.runner.kv_cache, seq.block_table, self.peer_pools[dst], msg[3], dst, rid,
                                    self.copy_stream)
                self.sends.append(t)
                self.to_wait.put(t)
        elif kind == "ipc_done":  # the prefill worker's copy into our reserved blocks has finished
            _, rid, nbytes, seconds = msg
            self.ipc_reserved.discard(rid)
            if rid in self.ipc_aborted:
                self.ipc_aborted.discard(rid)
                e.release(rid)
            elif rid in e.handoff:
                e.admit(rid)
                self.conn.send(("received", rid, nbytes, seconds))
        elif kind == "peers":
            self.peer_handles.update(msg[1])
        elif kind == "drop":
            e.release(msg[1])
        elif kind == "abort":
            rid, release_now = msg[1], len(msg) < 3 or msg[2]
            e.abort_request(rid)
            if rid in self.ipc_reserved and not release_now:
                self.ipc_aborted.add(rid)  # a copy into these blocks may be running: free them once it is done
            else:
                self.ipc_reserved.discard(rid)
                e.release(rid)
            self.waiting_reserve = deque(m for m in self.waiting_reserve if m[1] != rid)
            self.recvs = [t for t in self.recvs if t.request_id != rid]  # a dead sender's KV never comes
        elif kind == "stats":
            self.conn.send(("stats", self.stats()))
        elif kind == "shutdown":
            return False
        return True

    def step(self) -> None:
        e = self.engine
        for d in e.step():
            self.conn.send(("tokens", d.request_id, d.index, d.token_ids, d.finish_reason if d.finished else None))
            if d.finished and d.request_id in e.requests and e.requests[d.request_id].finished:
                e.pop_finished(d.request_id)
        if self.spec.role == "prefill":
            for seq in e.detach_prefilled():
                self.conn.send(("prefilled", seq.request_id, seq.token_ids[-1], len(seq.block_table)))

    def try_reserve(self) -> None:
        e = self.engine
        while self.waiting_reserve:
            _, rid, prompt, first, params, seed, src, tag, ipc = self.waiting_reserve[0]
            blocks = e.reserve(rid, prompt, first, params, seed)
            if blocks is None:
                return  # FCFS: wait for blocks to free up
            self.waiting_reserve.popleft()
            if ipc:  # the prefill worker on this GPU copies straight into these blocks
                self.ipc_reserved.add(rid)
                self.conn.send(("reserved", rid, list(blocks)))
                continue
            self.started[rid] = time.perf_counter()
            t = recv_kv(e.runner.kv_cache, blocks, src, tag, rid)
            self.recvs.append(t)
            self.to_wait.put(t)
            self.conn.send(("reserved", rid))

    def poll_transfers(self) -> None:
        e = self.engine
        while True:
            try:
                t, err, finished = self.completed.get_nowait()
            except queue.Empty:
                return
            seconds = finished - self.started.pop(t.request_id, finished)  # posted -> completed
            if t in self.sends:
                self.sends.remove(t)
                e.release(t.request_id)
                self.conn.send(("error", t.request_id, f"KV send failed: {err}") if err else
                               ("sent", t.request_id, t.nbytes, seconds, t.peer))
            elif t in self.recvs:
                self.recvs.remove(t)
                if err:
                    e.release(t.request_id)
                    self.conn.send(("error", t.request_id, f"KV receive failed: {err}"))
                elif t.request_id in e.handoff:
                    scatter_blocks(e.runner.kv_cache, t.blocks, t.buf)
                    e.admit(t.request_id)
                    self.conn.send(("received", t.request_id, t.nbytes, seconds))

    def stats(self) -> dict:
        e = self.engine
        return dict(rank=self.spec.rank, role=self.spec.role, num_blocks=e.runner.num_blocks,
                    num_free_blocks=e.num_free_blocks(), running=len(e.scheduler.running),
                    waiting=len(e.scheduler.waiting), handoff=len(e.handoff),
                    queued_prefill_tokens=sum(len(s) - s.num_computed_tokens for s in e.scheduler.waiting))
