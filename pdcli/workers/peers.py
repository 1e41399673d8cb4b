"""A worker's KV process groups: one per (prefill, decode) pair it belongs to, joined when the coordinator
makes the pair (ConnectPeers), on the coordinator's store under the pair's own prefix. Pairs come and go
(workers on other nodes join and leave) without touching the others."""
from __future__ import annotations

import logging
from datetime import timedelta

import torch

from pdcli.messages import ConnectPeers, PeersConnected
from pdcli.workers.kv_transfer import PairGroup, pair_group

logger = logging.getLogger("pdcli.worker")

PAIR_TIMEOUT_S = 30.0  # joining a pair's group, and each transfer on it, fails after this long (a hung peer)


class Peers:
    def __init__(self, rank: int, device: torch.device, store=None, host: str = "127.0.0.1",
                 timeout_s: float = PAIR_TIMEOUT_S, store_addr: tuple[str, int] | None = None, mirror=None):
        """store: a client of the coordinator's store (None: no pairs), at store_addr; host: the address this
        worker's groups listen on (gloo binds it, never every interface); mirror: sends a message to this
        worker's tensor-parallel followers, which join their shards' pairs too (distributed/tp_kv.py)."""
        self.rank, self.device, self.store, self.host = rank, device, store, host
        self.store_addr, self.mirror = store_addr, mirror
        self.timeout = timedelta(seconds=timeout_s)
        self.groups: dict[tuple[int, int], PairGroup] = {}  # (sender rank, receiver rank) -> its group

    def connect(self, msg: ConnectPeers) -> PeersConnected:
        connected, failed = [], {}
        if self.mirror is not None:
            from pdcli.distributed.tp_kv import TPConnectPairs

            self.mirror(TPConnectPairs(self.store_addr, self.host, self.rank,
                                       [p for p in msg.pairs if self.rank in (p.src, p.dst)]))
        for p in msg.pairs:
            if self.rank not in (p.src, p.dst) or (p.src, p.dst) in self.groups:
                continue
            if self.store is None:
                failed[p] = "this worker has no store"
                continue
            try:
                self.groups[(p.src, p.dst)] = pair_group(self.store, p.prefix, 0 if p.src == self.rank else 1,
                                                         self.device, self.host, self.timeout)
                connected.append(p)
            except Exception as err:  # a peer that died or hangs: the pair is not made, the worker goes on
                failed[p] = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                logger.warning("KV group %d -> %d not made: %s", p.src, p.dst, failed[p])
        return PeersConnected(self.rank, connected, failed)

    def forget(self, rank: int) -> None:
        """Drop the groups with a worker that is gone (their transfers have failed or will time out)."""
        for key in [k for k in self.groups if rank in k]:
            del self.groups[key]
