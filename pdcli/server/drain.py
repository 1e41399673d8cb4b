"""SIGTERM as a drain (how containers stop): uvicorn's server, except that the first SIGTERM stops taking requests
(new ones get 503, /health says draining) while the requests in flight finish, for at most drain_timeout s;
those still running then are aborted, and uvicorn shuts down as on Ctrl-C. Ctrl-C, or a second SIGTERM, stops
at once as before."""
from __future__ import annotations

import logging
import signal
import threading
import time

import uvicorn

logger = logging.getLogger("pdcli.server")

POLL_S = 0.05


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, server, cs, drain_timeout: float):
        """server: the app's OpenAIServer (its draining flag); cs: the CentralScheduler (its requests)."""
        super().__init__(config)
        self.openai, self.cs, self.drain_timeout = server, cs, drain_timeout
        self.drain_thread: threading.Thread | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM and self.drain_thread is None and not self.should_exit:
            self.openai.draining = True
            self.drain_thread = threading.Thread(target=self.drain, name="pdcli-drain", daemon=True)
            self.drain_thread.start()
            return
        super().handle_exit(sig, frame)

    def drain(self) -> None:
        """Wait for the requests in flight (at most drain_timeout s), abort the rest, then let uvicorn exit."""
        began = time.monotonic()
        logger.warning("SIGTERM: draining %d request(s), at most %.0f s", len(self.cs.active), self.drain_timeout)
        while self.cs.active and time.monotonic() - began < self.drain_timeout:
            time.sleep(POLL_S)
        with self.cs.lock:
            left = list(self.cs.active)
        for rid in left:
            self.cs.abort(rid, "the server shut down (drain timeout)")
        if left:
            logger.warning("drain timeout: aborted %d request(s)", len(left))
        self.should_exit = True
