"""The progress of partly prefilled prompts, reported once the device has run the steps that made it."""
from __future__ import annotations

from pdcli.engine.step_future import StepFuture


class PrefillProgress:
    """(request id, prompt tokens computed) per landed step, held until the device has run the step: a step that
    only prefills part of a prompt samples nothing, so its host side returns at once while the device may still
    run it (StepFuture.landed); a worker reports progress to the router, which counts a chunk as queued till then."""

    def __init__(self):
        self._pending: list[tuple[StepFuture, list[tuple[str, int]]]] = []  # oldest first
        self._landed = 0  # how many of those a later step's landing shows the device has run

    def add(self, fut: StepFuture) -> None:
        """A step landed on the host: keep its progress (none: nothing to keep)."""
        if fut.prefill_progress:
            self._pending.append((fut, fut.prefill_progress))

    def device_ran_all(self) -> None:
        """A step that sampled has landed (its result waited for the device): it ran every step before it."""
        self._landed = len(self._pending)

    def take(self) -> list[tuple[str, int]]:
        """The progress of the steps the device has finished since the last call, oldest first (the device runs
        them in order: past the first unfinished, none is known finished)."""
        k = self._landed
        while k < len(self._pending) and self._pending[k][0].landed():
            k += 1
        out = [p for _, progress in self._pending[:k] for p in progress]
        del self._pending[:k]
        self._landed = 0
        return out
