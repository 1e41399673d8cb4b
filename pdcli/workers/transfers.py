"""A worker's in-flight KV transfers: the streams they run on and the threads that wait for them."""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import torch

from pdcli.workers.kv_transfer import PendingTransfer, wait_done

# (transfer, error or None, device seconds or None) -> None; called on the worker's main thread
OnDone = Callable[[PendingTransfer, str | None, float | None], None]


class Transfers:
    """A side stream for gathers, sends and receives; a timing stream per peer (`mark_done`); one thread per
    peer that waits for its transfers in issue order (a dead peer stalls only its own), whose results the
    worker's loop hands to each transfer's owner (`poll`)."""

    def __init__(self, kv_cache: torch.Tensor):
        self.kv_cache = kv_cache
        self.side_stream = torch.cuda.Stream(kv_cache.device) if kv_cache.is_cuda else None
        self.timing_streams: dict[int, torch.cuda.Stream] = {}
        self.waiters: dict[int, queue.Queue] = {}
        self.completed: queue.Queue = queue.Queue()  # (transfer, owner, error, seconds, perf_counter at the end)
        self.posted_at: dict[PendingTransfer, float] = {}

    def timing(self, peer: int) -> torch.cuda.Stream | None:
        if self.side_stream is None:
            return None
        if peer not in self.timing_streams:
            self.timing_streams[peer] = torch.cuda.Stream(self.side_stream.device)
        return self.timing_streams[peer]

    def track(self, t: PendingTransfer, owner: OnDone, posted_at: float | None = None) -> None:
        """t is posted: its peer's waiter reports its end to owner. posted_at (perf_counter): where a transfer
        has no device timing (CPU, receives), its time runs from here (default: now)."""
        self.posted_at[t] = time.perf_counter() if posted_at is None else posted_at
        q = self.waiters.get(t.peer)
        if q is None:
            q = self.waiters[t.peer] = queue.Queue()
            threading.Thread(target=self._wait_loop, args=(q,), name=f"pdcli-kv-wait-{t.peer}", daemon=True).start()
        q.put((t, owner))

    def _wait_loop(self, q: queue.Queue) -> None:
        stream = None
        if self.kv_cache.is_cuda:
            torch.cuda.set_device(self.kv_cache.device)
            stream = torch.cuda.Stream(self.kv_cache.device)
        while True:
            t, owner = q.get()
            try:
                seconds = wait_done(t, stream)
                self.completed.put((t, owner, None, seconds, time.perf_counter()))
            except Exception as err:  # a dead peer
                self.completed.put((t, owner, str(err), None, time.perf_counter()))

    def poll(self) -> None:
        """Hand every finished transfer to its owner: (transfer, error, seconds from its posting or device time)."""
        while True:
            try:
                t, owner, err, seconds, finished = self.completed.get_nowait()
            except queue.Empty:
                return
            posted = self.posted_at.pop(t, finished)
            owner(t, err, finished - posted if seconds is None else seconds)

    def synchronize(self) -> None:
        if self.side_stream is not None:
            self.side_stream.synchronize()
