"""StepFuture: one launched step's sampled tokens (and log-probabilities), landed on the host when asked."""
from __future__ import annotations

import torch

from pdcli.engine.scheduler import SchedulerOutput
from pdcli.engine.sampler import LogprobsTensors
from pdcli.engine.sequence import Sequence


class StepFuture:
    """The sampled tokens (and log-probabilities) of a launched step; result() waits for them (copied to pinned
    host memory). has_grammar: a row's grammar needs this step's tokens before the next step's mask."""

    def __init__(self, out: SchedulerOutput, rows: list[Sequence], counts: list[int], tokens: torch.Tensor | None,
                 device: torch.device | None, logprobs: LogprobsTensors | None = None, has_grammar: bool = False):
        self.out, self.rows, self.counts, self.has_grammar = out, rows, counts, has_grammar
        self.prefill_progress: list[tuple[str, int]] = []  # set by the engine at launch (SchedulerOutput.partial_prompts)
        self.has_forks = any(c > 1 for c in counts)
        self._host, self._event, self._logprobs = None, None, None
        self._done: torch.cuda.Event | None = None  # a step that samples nothing: its end on the device
        if tokens is None and device is not None and device.type == "cuda":
            self._done = torch.cuda.Event()
            self._done.record()
        if tokens is not None:
            tensors = [tokens] if logprobs is None else [tokens, logprobs.sampled, logprobs.top_ids,
                                                         logprobs.top_logprobs]
            if device.type == "cuda":
                host = [torch.empty(x.shape, dtype=x.dtype, pin_memory=True) for x in tensors]
                for h, x in zip(host, tensors):
                    h.copy_(x, non_blocking=True)
                self._event = torch.cuda.Event()
                self._event.record()
            else:
                host = tensors
            self._host, self._logprobs = host[0], (host[1:] or None)

    def landed(self) -> bool:
        """Whether the device has finished the step, without waiting: a step that sampled has once result() returned;
        one that only prefilled part of a prompt returns from result() at once, while the device may still run it
        (one H100: an 8k-token chunk's progress reached the router ~20 ms after launch, ~200 ms before it ran)."""
        return self._done is None or self._done.query()

    def result(self) -> list[list[int]]:
        """Per scheduled seq: its sampled tokens (empty mid-prefill)."""
        if self._host is None:
            return [[] for _ in self.out.seqs]
        if self._event is not None:
            self._event.synchronize()
        it = iter(self._host.tolist())
        got = {seq.seq_id: [next(it) for _ in range(c)] for seq, c in zip(self.rows, self.counts)}
        return [got.get(s.seq_id, []) for s in self.out.seqs]

    def logprobs(self) -> list[list] | None:
        """Per scheduled seq, aligned with result(): a SampleLogprob per sampled token (None where the request did
        not ask); None when no row asked. Call after result()."""
        if self._logprobs is None:
            return None
        from pdcli.outputs import SampleLogprob

        sampled, top_ids, top_lps = (x.tolist() for x in self._logprobs)
        got, r = {}, 0
        for seq, c in zip(self.rows, self.counts):
            k = seq.params.logprobs
            got[seq.seq_id] = [None if k is None else SampleLogprob(sampled[i], tuple(top_ids[i][:k]),
                                                                     tuple(top_lps[i][:k])) for i in range(r, r + c)]
            r += c
        return [got.get(s.seq_id, []) for s in self.out.seqs]
