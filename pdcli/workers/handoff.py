"""The P/D handoff on a worker, as two state machines: `HandoffSender` on the worker that prefills (a prefill
worker, or a collocated one prefilling for another) and `HandoffReceiver` on the worker that decodes. The
coordinator relays between them (coordinator/handoff_relay.py); messages in pdcli/messages.py.

Sender, per request (its destination came as SendKV):
    DEST_KNOWN --its last prefill chunk launches, layer-wise--> SENDING (groups of layers during that step)
    DEST_KNOWN --its last prefill chunk launches, whole------> ANNOUNCED --after that step--> SENDING
    DEST_KNOWN --it left the batch (prefilled) or was there-> SENDING (all layers, or an IPC copy)
    SENDING --done, the sequence has left the batch or ended--> (blocks released)
    SENDING --done while the step that samples its first token is in flight--> SENT_EARLY --it leaves--> released
Receiver, per request (Reserve):
    WAITING_BLOCKS --free blocks, first come first served--> RESERVED
    RESERVED: the KV lands (receives, or the IPC copy) and the first token comes, in either order --both--> admitted
    RESERVED --aborted while an IPC copy may still write its blocks--> COPY_ABORTED --the copy ends--> released
"""
from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from pdcli.messages import (FirstToken, IpcCopyDropped, KVReceived, KVSent, PostReceives, Prefilled, RequestFailed, Reserve,
                            Reserved, SendKV, SendsAnnounced, TransferItem)
from pdcli.distributed.tp_kv import TPDropRecv, TPRecvKV, TPScatter, TPSendKV
from pdcli.workers.kv_transfer import (LayerSender, PendingTransfer, copy_kv_ipc, import_pool, recv_kv, scatter_blocks,
                                       send_kv)
from pdcli.workers.transfers import Transfers

Post = Callable[[object], None]  # a message to the coordinator


class SendState(enum.Enum):
    DEST_KNOWN = "dest known"
    ANNOUNCED = "announced"
    SENDING = "sending"
    SENT_EARLY = "sent early"


def _mirror(engine, message) -> None:
    """A data-plane call for the engine's tensor-parallel followers, on their KV shards (distributed/tp_kv.py);
    message() is built only when there are followers."""
    if engine.runner.tp_followers:
        engine.runner.tp_broadcast(message())


@dataclass
class Outgoing:
    dest: SendKV
    state: SendState = SendState.DEST_KNOWN
    blocks: list[int] | None = None  # ANNOUNCED: the blocks to send after the step
    posted_at: float | None = None  # perf_counter when its send was decided (timing without device events)


class HandoffSender:
    def __init__(self, engine, rank: int, post: Post, transfers: Transfers, groups: dict):
        self.engine, self.rank, self.post, self.transfers = engine, rank, post, transfers
        self.groups = groups  # (sender rank, receiver rank) -> its process group (NCCL); else the default
        self.out: dict[str, Outgoing] = {}
        self.in_flight: set[PendingTransfer] = set()
        self.new_layer_sends: list[PendingTransfer] = []  # posted during the step being launched
        self.announced: list[str] = []  # whole sends announced at launch, in announced order
        self.peer_handles: dict[int, tuple] = {}  # decode rank -> CUDA IPC handle of its pool (same GPU)
        self.peer_pools: dict[int, torch.Tensor] = {}
        engine.set_kv_sender(self.at_launch)  # any worker can be asked to prefill for another

    @property
    def busy(self) -> bool:
        return bool(self.in_flight)

    def on_send_kv(self, msg: SendKV) -> None:
        rid = msg.request_id
        self.out[rid] = Outgoing(msg)
        if self.engine.in_handoff(rid):  # prefilled already: all layers now
            self.start(rid)
        elif not self.engine.has_request(rid):  # finished (or aborted) before its handoff
            self.forget(rid)

    def forget(self, rid: str) -> None:
        """The request's KV will not be sent (dropped, aborted, ended on its first token); a send already
        posted or announced runs to its end, since the receives for it are posted."""
        o = self.out.get(rid)
        if o is None or o.state in (SendState.ANNOUNCED, SendState.SENDING):
            return
        del self.out[rid]
        if o.state is SendState.DEST_KNOWN and o.dest.dst_blocks is not None:
            self.post(IpcCopyDropped(rid, o.dest.dst_rank))  # the decode worker frees the blocks it kept

    def at_launch(self, seqs: list, lens: list[int]) -> LayerSender | None:
        """At the launch of an eager step, for the sequences whose last prefill chunk it runs and whose decode
        worker (not on this GPU) has reserved blocks: sends announced now, so the receives are posted before the
        data is ready; layer by layer during the forward (the returned callback), or all layers after it."""
        layers, whole = [], []
        for seq, n in zip(seqs, lens):
            o = self.out.get(seq.request_id)
            if (o is None or o.state is not SendState.DEST_KNOWN or o.dest.dst_blocks is not None
                    or seq.num_output_tokens != 0 or seq.num_computed_tokens + n != len(seq) or seq.params.max_tokens <= 1):
                continue
            o.blocks, o.posted_at = list(seq.block_table), time.perf_counter()
            o.state = SendState.SENDING if o.dest.layerwise else SendState.ANNOUNCED
            (layers if o.dest.layerwise else whole).append(o)
        for group, layerwise in ((layers, True), (whole, False)):  # the order the sends are posted in
            for dst in dict.fromkeys(o.dest.dst_rank for o in group):
                self.post(SendsAnnounced(dst, [TransferItem(o.dest.request_id, len(o.blocks), o.dest.tag)
                                               for o in group if o.dest.dst_rank == dst], layerwise))
        self.announced.extend(o.dest.request_id for o in whole)
        if not layers:
            return None
        dsts = {o.dest.dst_rank for o in layers}
        sender = LayerSender(self.engine.kv_cache, [(o.dest.request_id, o.blocks, o.dest.dst_rank, o.dest.tag)
                                                    for o in layers], self.transfers.side_stream,
                             {d: self.transfers.timing(d) for d in dsts},
                             {d: self.groups[(self.rank, d)] for d in dsts})
        self.new_layer_sends.extend(sender.transfers)
        return sender

    def after_step(self, finished: list[str]) -> None:
        """After an engine step: requests that ended in it are forgotten; the layer-wise sends it posted are
        tracked; the whole sends announced at its launch are posted, in announced order, before any other
        (also those of sequences that ended on their first token: their receives are posted); sequences whose
        first token landed leave the batch."""
        for rid in finished:
            self.forget(rid)
        for t in self.new_layer_sends:
            self._track(t)
        self.new_layer_sends = []
        for rid in self.announced:
            o = self.out[rid]
            o.state = SendState.SENDING
            self._send_whole(rid, o.blocks, o.dest)
        self.announced = []
        for seq in self.engine.detach_prefilled():
            rid = seq.request_id
            self.post(Prefilled(rid, seq.token_ids[-1], len(seq.block_table)))
            o = self.out.get(rid)
            if o is not None and o.state is SendState.DEST_KNOWN:
                self.start(rid)
            elif o is not None and o.state is SendState.SENT_EARLY:
                del self.out[rid]
                self.engine.release(rid)

    def start(self, rid: str) -> None:
        """All layers of a sequence that has left the batch, at once: over dist, or an IPC copy on this GPU."""
        o = self.out[rid]
        o.state, o.posted_at = SendState.SENDING, time.perf_counter()
        blocks, d = self.engine.handoff_blocks(rid), o.dest
        if d.dst_blocks is None:
            self.post(SendsAnnounced(d.dst_rank, [TransferItem(rid, len(blocks), d.tag)], False))
            self._send_whole(rid, blocks, d)
            return
        if d.dst_rank not in self.peer_pools:
            self.peer_pools[d.dst_rank] = import_pool(self.peer_handles[d.dst_rank])
        self._track(copy_kv_ipc(self.engine.kv_cache, blocks, self.peer_pools[d.dst_rank], d.dst_blocks, d.dst_rank, rid,
                                self.transfers.side_stream))

    def _send_whole(self, rid: str, blocks: list[int], d: SendKV) -> None:
        _mirror(self.engine, lambda: TPSendKV(rid, blocks, d.dst_rank, d.tag))
        self._track(send_kv(self.engine.kv_cache, blocks, d.dst_rank, d.tag, rid, self.transfers.side_stream,
                            self.transfers.timing(d.dst_rank), self.groups[(self.rank, d.dst_rank)]))

    def _track(self, t: PendingTransfer) -> None:
        self.in_flight.add(t)
        o = self.out.get(t.request_id)
        self.transfers.track(t, self.on_done, o.posted_at if o is not None else None)

    def on_done(self, t: PendingTransfer, err: str | None, seconds: float) -> None:
        self.in_flight.discard(t)
        rid, e = t.request_id, self.engine
        if e.in_handoff(rid) or not e.has_request(rid):
            self.out.pop(rid, None)
            e.release(rid)
        else:  # layer-wise sends done while the step that samples its first token is in flight
            self.out[rid].state = SendState.SENT_EARLY
        self.post(RequestFailed(rid, f"KV send failed: {err}") if err else KVSent(rid, t.peer, t.nbytes, seconds, t.kind))

    def close(self) -> None:
        """Release the peer pools mapped through CUDA IPC: a mapping never released keeps the exporting worker's
        reference count up (torch warns at its exit)."""
        self.peer_pools.clear()


class RecvState(enum.Enum):
    WAITING_BLOCKS = "waiting for blocks"
    RESERVED = "reserved"
    COPY_ABORTED = "aborted, copy may be running"


@dataclass
class Incoming:
    reserve: Reserve
    state: RecvState = RecvState.WAITING_BLOCKS
    first_token: int | None = None
    kv_bytes: int | None = None  # the KV has landed in the reserved blocks


class HandoffReceiver:
    def __init__(self, engine, rank: int, post: Post, transfers: Transfers, groups: dict):
        self.engine, self.rank, self.post, self.transfers, self.groups = engine, rank, post, transfers, groups
        self.incoming: dict[str, Incoming] = {}
        self.waiting: deque[str] = deque()  # WAITING_BLOCKS, first come first served
        self.receiving: set[PendingTransfer] = set()

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.receiving)

    def on_reserve(self, msg: Reserve) -> None:
        self.incoming[msg.request_id] = Incoming(msg)
        self.waiting.append(msg.request_id)

    def try_reserve(self) -> None:
        while self.waiting:
            inc = self.incoming[self.waiting[0]]
            r = inc.reserve
            blocks = self.engine.reserve(r.request_id, r.prompt_ids, r.params, r.seed)
            if blocks is None:
                return  # wait for blocks to free up
            self.waiting.popleft()
            inc.state = RecvState.RESERVED
            self.post(Reserved(r.request_id, list(blocks) if r.ipc_copy else None))

    def on_post_receives(self, msg: PostReceives) -> None:
        group = self.groups[(msg.src_rank, self.rank)]
        _mirror(self.engine, lambda: TPRecvKV([(i.request_id, i.num_blocks, i.tag) for i in msg.items], msg.src_rank,
                                              msg.layerwise))
        for t in recv_kv(self.engine.kv_cache, [(i.request_id, i.num_blocks, i.tag) for i in msg.items], msg.src_rank,
                         msg.layerwise, self.transfers.side_stream, self.transfers.timing(msg.src_rank), group):
            self.receiving.add(t)
            self.transfers.track(t, self.on_received)

    def on_first_token(self, msg: FirstToken) -> None:
        inc = self.incoming.get(msg.request_id)  # the prefill may end before blocks were free here
        if inc is not None and inc.state is not RecvState.COPY_ABORTED:
            inc.first_token = msg.token_id
            self._maybe_admit(msg.request_id)

    def on_copy_done(self, rid: str, nbytes: int | None) -> None:
        """The IPC copy into rid's blocks has ended (nbytes None: it was never posted)."""
        inc = self.incoming.get(rid)
        if inc is None:
            return
        if inc.state is RecvState.COPY_ABORTED or nbytes is None:
            del self.incoming[rid]
            self.engine.release(rid)
        elif inc.state is RecvState.RESERVED:
            inc.kv_bytes = nbytes
            self._maybe_admit(rid)

    def abort(self, rid: str, wait_for_ipc_copy: bool) -> bool:
        """Forget rid; True if its blocks stay held until an IPC copy into them ends (else the caller frees them)."""
        inc = self.incoming.pop(rid, None)
        if inc is None:
            return False
        if inc.state is RecvState.WAITING_BLOCKS:
            self.waiting.remove(rid)
        self.receiving = {t for t in self.receiving if t.request_id != rid}  # landing nowhere
        _mirror(self.engine, lambda: TPDropRecv(rid))
        copying = inc.state is not RecvState.WAITING_BLOCKS and inc.reserve.ipc_copy and inc.kv_bytes is None
        if wait_for_ipc_copy and copying:
            self.incoming[rid] = Incoming(inc.reserve, RecvState.COPY_ABORTED)
            return True
        return False

    def on_received(self, t: PendingTransfer, err: str | None, seconds: float) -> None:
        if t not in self.receiving:
            return  # aborted meanwhile: the KV is dropped
        self.receiving.discard(t)
        rid, e = t.request_id, self.engine
        if not e.in_handoff(rid):
            return
        blocks = e.handoff_blocks(rid)
        problem = f"KV receive failed: {err}" if err else None
        if problem is None and t.bufs[0].shape[2] != len(blocks):
            problem = f"KV of {t.bufs[0].shape[2]} blocks for {len(blocks)} reserved ones"
        if problem is not None:
            _mirror(e, lambda: TPDropRecv(rid))
            self.incoming.pop(rid, None)
            e.release(rid)
            self.post(RequestFailed(rid, problem))
            return
        buf = t.bufs[0]
        if buf.is_cuda:
            buf.record_stream(torch.cuda.current_stream(buf.device))  # allocated on the side stream
        _mirror(e, lambda: TPScatter(rid, list(blocks)))  # the followers' shards land before the next step
        scatter_blocks(e.kv_cache, blocks, buf)
        if rid in self.incoming:
            self.incoming[rid].kv_bytes = t.nbytes
            self._maybe_admit(rid)

    def _maybe_admit(self, rid: str) -> None:
        inc = self.incoming[rid]
        if inc.state is RecvState.RESERVED and inc.kv_bytes is not None and inc.first_token is not None and self.engine.in_handoff(rid):
            del self.incoming[rid]
            self.engine.admit(rid, inc.first_token)
            self.post(KVReceived(rid, inc.kv_bytes))
