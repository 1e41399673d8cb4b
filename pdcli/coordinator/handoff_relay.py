"""The coordinator's part of a P/D handoff: it starts one (the decode worker reserves blocks while the
prompt prefills), relays each side's messages to the other, and cleans up when a request or a worker ends
early. The workers' state machines are in workers/handoff.py; the messages in pdcli/messages.py."""
from __future__ import annotations

from pdcli.coordinator.tracked import Stage, Tracked
from pdcli.coordinator.worker_pool import WorkerHandle, WorkerPool, same_gpu
from pdcli.messages import (Abort, DropKV, FirstToken, IpcCopyCancelled, IpcCopyDone, IpcCopyDropped, KVReceived, KVSent,
                            PostReceives, Prefilled, Reserve, Reserved, SendKV, SendsAnnounced, Submit)


class HandoffRelay:
    def __init__(self, pool: WorkerPool, requests: dict[str, Tracked], fail, accounting: dict):
        """fail(t, message): end a request with an error; accounting: the disaggregated path's totals."""
        self.pool, self.requests, self.fail, self.accounting = pool, requests, fail, accounting
        self.kv_layerwise = True  # NCCL/gloo sends in groups of layers during the last prefill chunk when possible
        self.handlers = {kind: getattr(self, name) for kind, name in self.HANDLERS.items()}

    HANDLERS = {SendsAnnounced: "on_sends_announced", KVSent: "on_kv_sent", IpcCopyDropped: "on_ipc_copy_dropped",
                Prefilled: "on_prefilled", Reserved: "on_reserved", KVReceived: "on_kv_received"}

    def start(self, t: Tracked, prefill: WorkerHandle, decode: WorkerHandle) -> None:
        """The decode worker reserves blocks now, so the KV can stream to it while the prompt prefills."""
        t.prefill_rank, t.decode_rank, t.stage = prefill.spec.rank, decode.spec.rank, Stage.PREFILL
        decode.inflight.add(t.rid)
        self.pool.send(decode, Reserve(t.rid, t.prompt_ids, t.params, t.seed, same_gpu(prefill.spec, decode.spec)))
        prefill.inflight.add(t.rid)
        self.pool.send(prefill, Submit(t.rid, t.prompt_ids, t.params, t.seed, handoff=True))

    def _live(self, rank: int | None) -> WorkerHandle | None:
        w = None if rank is None else self.pool[rank]
        return w if w is not None and w.alive else None

    def _tracked(self, rid: str) -> Tracked | None:
        t = self.requests.get(rid)
        return None if t is None or t.done.is_set() else t

    # ---- from the prefill worker ----
    def on_sends_announced(self, w: WorkerHandle, msg: SendsAnnounced) -> None:
        """The decode worker must post these receives, in this order, whatever became of the requests (NCCL
        matches sends by order)."""
        dst = self._live(msg.dst_rank)
        if dst is not None:
            self.pool.send(dst, PostReceives(w.spec.rank, msg.items, msg.layerwise))

    def on_kv_sent(self, w: WorkerHandle, msg: KVSent) -> None:
        dst = self._live(msg.dst_rank)
        if msg.kind == "ipc" and dst is not None:  # it admits the sequence or frees its blocks
            self.pool.send(dst, IpcCopyDone(msg.request_id, msg.nbytes))
        self.accounting["transfer_bytes"] += msg.nbytes
        self.accounting["transfer_s"] += msg.seconds
        t = self.requests.get(msg.request_id)
        if t is not None:
            t.transfer_s, t.transfer_kind = msg.seconds, msg.kind
            t.transfer_reported.set()

    def on_ipc_copy_dropped(self, w: WorkerHandle, msg: IpcCopyDropped) -> None:
        dst = self._live(msg.dst_rank)
        if dst is not None:
            self.pool.send(dst, IpcCopyCancelled(msg.request_id))

    def on_prefilled(self, w: WorkerHandle, msg: Prefilled) -> None:
        t = self._tracked(msg.request_id)
        if t is None:
            self.pool.send(w, DropKV(msg.request_id))  # nobody will take this KV any more
            return
        t.stage = Stage.HANDOFF
        self.pool[t.prefill_rank].inflight.discard(t.rid)
        d = self.pool[t.decode_rank]
        if not d.alive:
            self.pool.send(w, DropKV(t.rid))
            self.fail(t, f"decode worker rank {d.spec.rank} is not alive")
            return
        self.pool.send(d, FirstToken(t.rid, msg.first_token))

    # ---- from the decode worker ----
    def on_reserved(self, w: WorkerHandle, msg: Reserved) -> None:
        t = self._tracked(msg.request_id)
        if t is None:
            self.pool.send(w, Abort(msg.request_id))  # the prefill worker was never told of these blocks
            return
        t.ipc_copy_asked = msg.blocks is not None
        self.pool.send(self.pool[t.prefill_rank], SendKV(t.rid, t.decode_rank, t.tag, msg.blocks, self.kv_layerwise))

    def on_kv_received(self, w: WorkerHandle, msg: KVReceived) -> None:
        t = self._tracked(msg.request_id)
        if t is not None:
            t.stage, t.transfer_bytes = Stage.DECODE, msg.nbytes

    # ---- a request or a worker ends early ----
    def abort(self, t: Tracked) -> None:
        """Tell both workers; blocks an IPC copy may still be writing are freed by the decode worker once done."""
        for rank in t.ranks:
            w = self._live(rank)
            if w is not None:
                self.pool.send(w, Abort(t.rid, wait_for_ipc_copy=t.ipc_copy_asked and rank == t.decode_rank))

    def ended_on_prefill(self, t: Tracked) -> None:
        """t finished on its prefill worker (on its first token): its decode worker frees the reserved blocks."""
        d = self._live(t.decode_rank) if t.stage == Stage.PREFILL else None
        if d is not None:
            self.pool.send(d, Abort(t.rid, wait_for_ipc_copy=t.ipc_copy_asked))

    def worker_died(self, t: Tracked, rank: int) -> bool:
        """Free what t holds on its other worker when the worker of rank dies; False if t lives on (its KV had
        already left the dead prefill worker)."""
        other = self._live(t.decode_rank if rank == t.prefill_rank else t.prefill_rank)
        if other is not None:
            if rank == t.decode_rank and t.stage == Stage.HANDOFF:
                self.pool.send(other, DropKV(t.rid))  # free the prefilled KV
            elif t.stage in (Stage.PREFILL, Stage.HANDOFF):  # a dead sender writes no more: free at once
                self.pool.send(other, Abort(t.rid))
        return not (rank == t.prefill_rank and t.stage == Stage.DECODE)
