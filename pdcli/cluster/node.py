"""`pdcli node`: join a head, start this host's workers (which dial the head themselves), send heartbeats;
Ctrl-C leaves (the head lets this node's requests finish, then lets it go), a second Ctrl-C stops at once.
A node whose connection to the head closes without Stop has lost the head (or was fenced off by it): it
stops its workers and exits non-zero."""
from __future__ import annotations

import logging
import threading
import time
from multiprocessing import AuthenticationError

from pdcli import __version__
from pdcli.cluster.fingerprint import model_fingerprint
from pdcli.cluster.messages import (HEARTBEAT_S, PROTOCOL_VERSION, Heartbeat, JoinAccepted, JoinRefused, JoinRequest,
                                    Leave, Stop, WorkerHello)
from pdcli.cluster.transport import HANDSHAKE_S, ClusterError, Dial, authkey, dial
from pdcli.workers.layout import WorkerSpec

logger = logging.getLogger("pdcli.cluster")

STOP_S = 10.0  # workers still running this long after the node stops are killed
CONNECT_S = 120.0  # a head not listening yet is dialled again for this long


class Node:
    def __init__(self, model: str, addr: tuple[str, int], node_rank: int, layout: list[WorkerSpec],
                 engine_kwargs: dict, mps: bool | None = None):
        """layout: this host's workers (their ranks are the head's to give)."""
        self.model, self.addr, self.node_rank, self.layout = model, addr, node_rank, layout
        self.engine_kwargs, self.mps_choice = engine_kwargs, mps
        self.key = authkey(addr[0])
        self.procs: list = []
        self.mps = None
        self.leaving = self.stopped = False
        self.send_lock = threading.Lock()

    def join(self) -> JoinAccepted:
        """Dial the head and ask to join: ClusterError (one line) if it cannot be reached or refuses."""
        where = f"{self.addr[0]}:{self.addr[1]}"
        fingerprint = model_fingerprint(self.model, self.engine_kwargs)
        try:
            self.conn, self.local = self._dial()
        except AuthenticationError:
            raise ClusterError(f"the head at {where} refused this node's cluster token (PDCLI_CLUSTER_TOKEN)") from None
        except OSError as err:
            raise ClusterError(f"cannot reach the head at {where}: {err}") from None
        self.conn.send(JoinRequest(self.node_rank, __version__, PROTOCOL_VERSION, fingerprint,
                                   [(s.role, s.device) for s in self.layout], self.local))
        reply = self.conn.recv() if self.conn.poll(HANDSHAKE_S * 6) else None
        if isinstance(reply, JoinRefused):
            raise ClusterError(f"the head at {where} refused node {self.node_rank}: {reply.reason}")
        if not isinstance(reply, JoinAccepted):
            raise ClusterError(f"the head at {where} did not answer the join")
        return reply

    def _dial(self):
        """The head may not be listening yet (nodes and head start together): retried for CONNECT_S."""
        deadline = time.monotonic() + CONNECT_S
        while True:
            try:
                return dial(self.addr, self.key)
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def start(self, accepted: JoinAccepted) -> None:
        from pdcli.coordinator.worker_pool import spawn_worker
        from pdcli.workers.mps import start_for

        specs = [WorkerSpec(r, s.role, s.device, self.node_rank) for r, s in zip(accepted.ranks, self.layout)]
        self.mps = start_for(specs, self.mps_choice)
        for spec in specs:
            link = Dial(self.addr, self.key, WorkerHello(accepted.join_id, spec.rank))
            self.procs.append(spawn_worker(spec, specs, self.model, self.engine_kwargs, link, accepted.store_addr,
                                           self.local, self.mps))
        threading.Thread(target=self._heartbeats, name="pdcli-heartbeat", daemon=True).start()

    def _send(self, msg) -> bool:
        with self.send_lock:
            try:
                self.conn.send(msg)
                return True
            except (OSError, ValueError):
                return False

    def _heartbeats(self) -> None:
        while self._send(Heartbeat()):
            time.sleep(HEARTBEAT_S)

    def run(self) -> int:
        """Until the head stops or is lost, or this node has left: its exit code (0: stopped or left)."""
        try:
            code = self._loop()
        except KeyboardInterrupt:  # a second Ctrl-C
            logger.warning("stopping now: workers killed")
            self.stop(0.0)
            return 130
        self.stop(STOP_S)
        return code

    def _loop(self) -> int:
        while True:
            try:
                msg = self.conn.recv() if self.conn.poll(0.2) else None
            except KeyboardInterrupt:
                if self.leaving:
                    raise
                self.leaving = True
                logger.warning("leaving: the head lets this node's requests finish (Ctrl-C again: stop now)")
                self._send(Leave())
                continue
            except (EOFError, OSError):
                if self.leaving or self.stopped:
                    return 0
                logger.error("lost the head (or was fenced off by it): stopping")
                return 1
            if isinstance(msg, Stop):
                self.stopped = True
            elif isinstance(msg, JoinRefused):
                logger.error("the head dropped this node: %s", msg.reason)
                return 1
            if self.procs and not any(p.is_alive() for p in self.procs) and not (self.leaving or self.stopped):
                logger.error("every worker of this node exited")
                return 1

    def stop(self, timeout: float) -> None:
        try:
            self.conn.close()  # the head fences off what is left of this node
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)
        if self.mps is not None:
            self.mps.stop()
