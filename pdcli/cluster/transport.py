"""Authenticated TCP connections for the control channel: multiprocessing's `Connection` (length-prefixed
pickles, the same API as a local pipe) after its HMAC challenge both ways on a shared secret,
PDCLI_CLUSTER_TOKEN (digests compared in constant time by `hmac.compare_digest`). The handshake is bounded
in time: a peer that connects and says nothing cannot stall the head. Nothing is encrypted: clusters run on
private networks."""
from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

TOKEN_ENV = "PDCLI_CLUSTER_TOKEN"
HANDSHAKE_S = 10.0
LOOPBACK_KEY = b"pdcli-loopback"  # the key when no token is set, allowed on loopback addresses only


class ClusterError(RuntimeError):
    """A cluster set-up that cannot go on (bad address, missing or refused token, refused join): one line."""


def parse_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad --dist-init-addr {text!r}: use HOST:PORT")
    return host, int(port)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def authkey(host: str) -> bytes:
    """The shared secret; required unless the cluster's address is loopback."""
    token = os.environ.get(TOKEN_ENV, "")
    if token:
        return token.encode()
    if not is_loopback(host):
        raise ClusterError(f"{host} is not a loopback address: set {TOKEN_ENV} (the same secret on every node)")
    return LOOPBACK_KEY


def _timeout(sock: socket.socket, seconds: float) -> None:
    """A receive timeout on the descriptor itself (Connection reads it with os.read); 0: none."""
    sec = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", sec, int((seconds - sec) * 1e6)))


def dial(addr: tuple[str, int], key: bytes, timeout: float = HANDSHAKE_S) -> tuple[Connection, str]:
    """Connect to the head and authenticate both ways: (the connection, this side's address on it). A wrong
    secret raises multiprocessing's AuthenticationError."""
    sock = socket.create_connection(addr, timeout=timeout)
    local = sock.getsockname()[0]
    return _handshake(sock, key, timeout, head=False), local


def accept(sock: socket.socket, key: bytes, timeout: float = HANDSHAKE_S) -> Connection:
    """The head's side of `dial` on an accepted socket."""
    return _handshake(sock, key, timeout, head=True)


def _handshake(sock: socket.socket, key: bytes, timeout: float, head: bool) -> Connection:
    """The challenge both ways (the head's first), its reads bounded by `timeout`; the socket becomes the
    connection (a descriptor of the same socket: the option set here holds for both)."""
    sock.settimeout(None)
    _timeout(sock, timeout)
    conn = Connection(os.dup(sock.fileno()))
    try:
        for step in (deliver_challenge, answer_challenge) if head else (answer_challenge, deliver_challenge):
            step(conn, key)
        _timeout(sock, 0)
    except BaseException:
        conn.close()
        raise
    finally:
        sock.close()
    return conn


@dataclass(frozen=True)
class Dial:
    """How a worker on a node reaches the head: handed to worker_main in place of a pipe."""
    addr: tuple[str, int]
    key: bytes
    hello: object  # the WorkerHello it sends first

    def connect(self) -> Connection:
        conn, _ = dial(self.addr, self.key)
        conn.send(self.hello)
        return conn
