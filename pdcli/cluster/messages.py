"""The control channel between a head and its nodes: one frozen dataclass per kind, as pdcli/messages.py.
A node dials the head and asks to join; its workers dial the head too, each with a WorkerHello first, and
then speak pdcli/messages.py like local workers.

  node -> head    JoinRequest    versions, the model's fingerprint, the workers it brings
  head -> node    JoinAccepted   their ranks and the store | JoinRefused (one line; the node exits non-zero)
  worker -> head  WorkerHello    which join and rank it is, then Ready
  node -> head    Heartbeat      every HEARTBEAT_S; MISSED_HEARTBEATS missed: the node is lost
  node -> head    Leave          Ctrl-C: no new requests, those running finish (bounded), then it goes
  head -> node    Stop           the head stops (a node whose connection closes without it lost the head)
"""
from __future__ import annotations

from dataclasses import dataclass

PROTOCOL_VERSION = 1  # of this channel and pdcli/messages.py together: a node must speak the head's
HEARTBEAT_S = 1.0
MISSED_HEARTBEATS = 3


@dataclass(frozen=True, slots=True)
class JoinRequest:
    node_rank: int
    pdcli_version: str
    protocol_version: int
    fingerprint: dict  # cluster/fingerprint.py
    workers: list[tuple[str, str]]  # (role, device), in the order its ranks are given
    host: str  # the address its workers' KV groups listen on


@dataclass(frozen=True, slots=True)
class JoinAccepted:
    join_id: int  # this join; a node that comes back joins as new
    ranks: list[int]  # of its workers, in the order asked (never reused)
    store_addr: tuple[str, int]  # the head's store: the KV pairs' groups meet there


@dataclass(frozen=True, slots=True)
class JoinRefused:
    reason: str  # one line


@dataclass(frozen=True, slots=True)
class WorkerHello:
    join_id: int
    rank: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    pass


@dataclass(frozen=True, slots=True)
class Leave:
    pass


@dataclass(frozen=True, slots=True)
class Stop:
    pass


TO_HEAD = (JoinRequest, WorkerHello, Heartbeat, Leave)
TO_NODE = (JoinAccepted, JoinRefused, Stop)
