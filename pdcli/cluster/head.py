"""The head's side of a cluster: a listener on --dist-init-addr (never every interface) that admits nodes
(`pdcli node`) after the token's handshake and the join check, gives their workers ranks (never reused),
adds each node's workers to the coordinator once all are ready, watches the nodes' heartbeats, and loses a
node (its requests end with errors, its connections closed: fenced off) on EOF, missed heartbeats or
leave."""
from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import AuthenticationError

from pdcli import __version__
from pdcli.cluster.fingerprint import join_mismatch
from pdcli.cluster.messages import (HEARTBEAT_S, MISSED_HEARTBEATS, Heartbeat, JoinAccepted, JoinRefused, JoinRequest,
                                    Leave, Stop, WorkerHello)
from pdcli.cluster.transport import HANDSHAKE_S, accept
from pdcli.coordinator.worker_pool import WorkerHandle, wait_ready
from pdcli.workers.layout import WorkerSpec

logger = logging.getLogger("pdcli.cluster")

LEAVE_S = 30.0  # a leaving node's requests get this long to finish; then they end with an error


@dataclass(eq=False)
class JoinedNode:
    """A node as the head sees it, from its JoinRequest until it is gone."""
    rank: int
    join_id: int
    conn: object
    specs: dict[int, WorkerSpec]  # rank -> spec
    deadline: float  # its workers must be ready by then (monotonic)
    ready: dict[int, WorkerHandle] = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)
    state: str = "joining"  # joining | joined | leaving | gone
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, msg) -> None:
        with self.send_lock:
            try:
                self.conn.send(msg)
            except (OSError, ValueError):
                pass


class ClusterHead:
    def __init__(self, cs, addr: tuple[str, int], key: bytes, fingerprint: dict, startup_timeout: float = 600.0):
        """cs: the CentralScheduler whose workers the nodes' join; key: the cluster's secret (transport.authkey)."""
        self.cs, self.pool, self.key, self.fingerprint = cs, cs.pool, key, fingerprint
        self.startup_timeout = startup_timeout
        self.lock = threading.Condition()
        self.nodes: dict[int, JoinedNode] = {}  # join id -> node (gone ones kept: their late workers are refused)
        self._ranks = itertools.count(max((w.spec.rank for w in self.pool.workers), default=-1) + 1)
        self._join_ids = itertools.count(1)
        self.closed = False
        self.sock = socket.create_server(addr, backlog=64)  # bound to the cluster's address only
        self.sock.settimeout(0.5)
        for target, name in ((self._accept_loop, "pdcli-cluster-accept"), (self._watch, "pdcli-cluster-watch")):
            threading.Thread(target=target, name=name, daemon=True).start()

    # ---- who is in ----
    def joined(self) -> set[int]:
        return {n.rank for n in self.nodes.values() if n.state == "joined"}

    def wait_for(self, nnodes: int, timeout: float) -> None:
        """Until nodes 1 .. nnodes - 1 have joined; else an error naming those missing."""
        want = set(range(1, nnodes))
        with self.lock:
            if not self.lock.wait_for(lambda: want <= self.joined(), timeout):
                missing = ", ".join(map(str, sorted(want - self.joined())))
                raise TimeoutError(f"node rank(s) {missing} did not join within {timeout:.0f} s")

    def close(self) -> None:
        """Stop admitting; tell every node the head stops, and close its control connection (the pool stops
        the node's workers)."""
        self.closed = True
        self.sock.close()
        for n in list(self.nodes.values()):
            if n.state != "gone":
                n.send(Stop())
                n.state = "gone"
                try:
                    n.conn.close()
                except OSError:
                    pass

    # ---- connections ----
    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                sock, peer = self.sock.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            threading.Thread(target=self._admit, args=(sock, peer), name="pdcli-cluster-admit", daemon=True).start()

    def _admit(self, sock: socket.socket, peer) -> None:
        try:
            conn = accept(sock, self.key)
            if not conn.poll(HANDSHAKE_S):
                raise TimeoutError("it said nothing")
            first = conn.recv()
        except AuthenticationError:
            logger.warning("refused a connection from %s: wrong cluster token", peer[0])
            return
        except (OSError, EOFError, TimeoutError) as err:
            logger.warning("refused a connection from %s: %s", peer[0], err or type(err).__name__)
            return
        if isinstance(first, JoinRequest):
            self._join(conn, first, peer[0])
        elif isinstance(first, WorkerHello):
            self._worker(conn, first)
        else:
            logger.warning("refused a connection from %s: it began with %s", peer[0], type(first).__name__)
            conn.close()

    def _join(self, conn, req: JoinRequest, peer: str) -> None:
        with self.lock:
            reason = join_mismatch(req, __version__, self.fingerprint)
            if req.node_rank < 1:
                reason = f"node rank {req.node_rank}: nodes are ranked from 1 (0 is the head)"
            elif any(n.rank == req.node_rank and n.state != "gone" for n in self.nodes.values()):
                reason = f"node rank {req.node_rank} is already in the cluster"
            if reason is None:
                jid = next(self._join_ids)
                specs = {r: WorkerSpec(r, role, dev, req.node_rank) for r, (role, dev) in
                         zip((next(self._ranks) for _ in req.workers), req.workers)}
                node = self.nodes[jid] = JoinedNode(req.node_rank, jid, conn, specs,
                                              time.monotonic() + self.startup_timeout)
        if reason is not None:
            logger.warning("refused node %d from %s: %s", req.node_rank, peer, reason)
            conn.send(JoinRefused(reason))
            conn.close()
            return
        logger.info("node %d from %s joining with %d worker(s)", req.node_rank, peer, len(specs))
        node.send(JoinAccepted(jid, list(specs), self.pool.store_addr))
        self._serve(node)

    def _serve(self, node: JoinedNode) -> None:
        """The node's control connection, until it is gone."""
        while node.state != "gone":
            try:
                if not node.conn.poll(0.5):
                    continue
                msg = node.conn.recv()
            except (EOFError, OSError):
                self.lose(node, "its connection closed")
                return
            node.last_seen = time.monotonic()
            if isinstance(msg, Leave):
                threading.Thread(target=self._leave, args=(node,), name="pdcli-cluster-leave", daemon=True).start()
            elif not isinstance(msg, Heartbeat):
                logger.warning("node %d sent %s: ignored", node.rank, type(msg).__name__)

    def _worker(self, conn, hello: WorkerHello) -> None:
        node = self.nodes.get(hello.join_id)
        spec = node.specs.get(hello.rank) if node is not None else None
        if spec is None or node.state != "joining" or hello.rank in node.ready:
            logger.warning("refused worker rank %d: its node is gone or did not ask for it", hello.rank)
            conn.close()
            return
        where = f"worker {spec.role} on node {node.rank} {spec.device}"
        try:
            info = wait_ready(conn, where, node.deadline)
        except (RuntimeError, TimeoutError) as err:
            conn.close()
            node.send(JoinRefused(str(err).splitlines()[0]))
            self.lose(node, str(err).splitlines()[0])
            return
        with self.lock:
            if node.state != "joining":
                conn.close()
                return
            node.ready[hello.rank] = WorkerHandle(spec, None, conn, info=info)
            if len(node.ready) < len(node.specs):
                return
            self.cs.add_workers([node.ready[r] for r in sorted(node.ready)])
            node.state = "joined"
            self.lock.notify_all()
        logger.info("node %d joined: %s", node.rank, ", ".join(f"{s.role} {s.device} (rank {s.rank})"
                                                               for s in node.specs.values()))

    # ---- leaving and loss ----
    def _watch(self) -> None:
        """Heartbeats, and workers that did not start in time."""
        limit = HEARTBEAT_S * MISSED_HEARTBEATS
        while not self.closed:
            time.sleep(HEARTBEAT_S / 4)
            now = time.monotonic()
            for node in list(self.nodes.values()):
                if node.state != "gone" and now - node.last_seen > limit:
                    self.lose(node, f"missed {MISSED_HEARTBEATS} heartbeats")
                elif node.state == "joining" and now > node.deadline:
                    node.send(JoinRefused(f"its workers did not start in {self.startup_timeout:.0f} s"))
                    self.lose(node, "its workers did not start in time")

    def _leave(self, node: JoinedNode) -> None:
        node.state = "leaving"
        handles = list(node.ready.values())
        for w in handles:
            w.leaving = True
        deadline = time.monotonic() + LEAVE_S
        while any(w.alive and w.inflight for w in handles) and time.monotonic() < deadline and node.state != "gone":
            time.sleep(0.1)
        self.lose(node, "it left")

    def lose(self, node: JoinedNode, why: str) -> None:
        """The node is gone: its workers fenced off and their requests ended; its connection closed."""
        with self.lock:
            if node.state == "gone":
                return
            was = node.state
            node.state = "gone"
            self.lock.notify_all()
        (logger.info if why == "it left" else logger.error)("node %d lost: %s", node.rank, why)
        if was in ("joined", "leaving"):
            self.pool.lose(set(node.specs), f"node {node.rank}: {why}")
        for w in node.ready.values():
            try:
                w.conn.close()
            except OSError:
                pass
        try:
            node.conn.close()
        except OSError:
            pass
