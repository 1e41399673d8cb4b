"""P/D handoffs between tensor-parallel workers: rank i's KV shard goes to rank i of the other worker, through
a pair group of their own (the pair's prefix + "tp<i>/"). Rank 0 does its part as any worker does
(workers/handoff.py) and mirrors each data-plane call to its followers, in order, through the TP channel;
a follower does the same call on its shard: layer-wise sends within the forward pass (`TPStep.layer_sends`),
whole sends, receives, the scatter into the reserved blocks (before the step that reads them, since the
channel is ordered), drops. A follower waits for its sends before its next message (their buffers and
blocks are then free), so it never needs to report back."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from pdcli.messages import ConnectPeers, PairSpec
from pdcli.workers.kv_transfer import LayerSender, recv_kv, scatter_blocks, send_kv, wait_done


@dataclass(frozen=True, slots=True)
class TPConnectPairs:
    store_addr: tuple[str, int]  # the coordinator's store
    host: str  # the address gloo binds
    worker_rank: int
    pairs: list[PairSpec]


@dataclass(frozen=True, slots=True)
class TPSendKV:
    request_id: str
    blocks: list[int]
    dst: int  # the receiving worker's rank
    tag: int


@dataclass(frozen=True, slots=True)
class TPRecvKV:
    items: list[tuple[str, int, int]]  # (request id, blocks, tag), in the sender's order
    src: int
    layerwise: bool


@dataclass(frozen=True, slots=True)
class TPScatter:
    request_id: str
    blocks: list[int]  # the reserved blocks its KV lands in


@dataclass(frozen=True, slots=True)
class TPDropRecv:
    request_id: str


def shard_pairs(pairs: list[PairSpec], tp_rank: int) -> list[PairSpec]:
    """The pairs of rank tp_rank's shards: their own groups beside rank 0's."""
    return [PairSpec(p.src, p.dst, f"{p.prefix}tp{tp_rank}/") for p in pairs]


class FollowerKV:
    """A follower rank's side of its worker's handoffs."""

    def __init__(self, runner, tp_rank: int):
        self.runner, self.tp_rank = runner, tp_rank
        self.peers = None  # workers/peers.Peers, on the coordinator's store once the first pairs come
        self.worker_rank = -1
        self.recvs: dict[str, object] = {}  # request id -> its PendingTransfer
        self.sends: list = []

    @property
    def kv_cache(self):
        return self.runner.kv_cache

    def handle(self, msg) -> None:
        handler = {TPConnectPairs: self.connect, TPSendKV: self.send, TPRecvKV: self.recv, TPScatter: self.scatter,
                   TPDropRecv: lambda m: self.recvs.pop(m.request_id, None)}[type(msg)]
        handler(msg)
        self.settle()

    def connect(self, msg: TPConnectPairs) -> None:
        if self.peers is None:
            import torch.distributed as dist

            from pdcli.workers.peers import PAIR_TIMEOUT_S, Peers

            store = dist.TCPStore(*msg.store_addr, is_master=False, timeout=timedelta(seconds=PAIR_TIMEOUT_S))
            self.peers = Peers(msg.worker_rank, self.kv_cache.device, store, msg.host)
            self.worker_rank = msg.worker_rank
        reply = self.peers.connect(ConnectPeers(shard_pairs(msg.pairs, self.tp_rank)))
        if reply.failed:
            raise RuntimeError(f"tensor-parallel rank {self.tp_rank}: KV pairs not made: {reply.failed}")

    def group(self, src: int, dst: int):
        return self.peers.groups[(src, dst)]

    def layer_sender(self, items: list[tuple[str, list[int], int, int]]) -> LayerSender:
        return LayerSender(self.kv_cache, items, None, {}, {d: self.group(self.worker_rank, d) for _, _, d, _ in items})

    def after_forward(self, sender: LayerSender | None) -> None:
        if sender is not None:
            self.sends.extend(sender.transfers)
        self.settle()

    def send(self, m: TPSendKV) -> None:
        self.sends.append(send_kv(self.kv_cache, m.blocks, m.dst, m.tag, m.request_id, None, None,
                                  self.group(self.worker_rank, m.dst)))

    def recv(self, m: TPRecvKV) -> None:
        for t in recv_kv(self.kv_cache, m.items, m.src, m.layerwise, None, None, self.group(m.src, self.worker_rank)):
            self.recvs[t.request_id] = t

    def scatter(self, m: TPScatter) -> None:
        t = self.recvs.pop(m.request_id, None)
        if t is not None:
            wait_done(t, None)
            scatter_blocks(self.kv_cache, m.blocks, t.bufs[0])

    def settle(self) -> None:
        """Wait for the sends posted so far."""
        for t in self.sends:
            wait_done(t, None)
        self.sends.clear()
