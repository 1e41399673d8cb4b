from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from pdcli.config import SchedulerConfig
from pdcli.engine.block_manager import BlockManager
from pdcli.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # per seq: prefill chunk length or 1
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) copy-on-write

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.num_new_tokens)

    def partial_prompts(self) -> list[tuple[str, int]]:
        """Once launched (Scheduler.advance): (request id, prompt tokens computed when the step lands) of the
        prompts it leaves partly prefilled (chunked prefill)."""
        return [(s.request_id, s.num_computed_tokens) for s in self.seqs if s.num_computed_tokens < s.num_prompt_tokens]


class Scheduler:
    """Continuous batching with chunked prefill: each step takes every running sequence's next
    tokens (a decode token or a prefill chunk), then admits waiting sequences FCFS, all under
    `max_num_batched_tokens`. When blocks run out, the latest-admitted running sequence is
    preempted: its blocks are freed and it is recomputed later (same tokens, same output)."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int, eos_token_ids: set[int]):
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_block_copies = 0
        # expected fraction of its remaining max_tokens a sequence still generates (EMA over finished ones)
        self.reserve_ratio = config.admission_reserve

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_pending and self._at_limit(seq, len(seq)) or \
                    seq.handoff_after_prefill and seq.num_computed_tokens >= seq.num_prompt_tokens:
                i += 1  # its in-flight token is its last here: it finishes, or is handed off, when that lands
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            while not bm.allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                out.seqs.append(seq)
                out.num_new_tokens.append(n)
                budget -= n
                i += 1
        reserve = self._reserved_blocks() if self.waiting and self.reserve_ratio > 0 else 0
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending:
                break  # preempted with a token in flight: admitted once that token has landed
            cached = bm.match_prefix(seq)
            n = min(len(seq) - len(cached) * bm.block_size, budget)
            future = self._future_blocks(seq, len(cached)) if self.reserve_ratio > 0 else 0
            if self.running and bm.num_free_blocks - future < reserve:
                break  # the running sequences are expected to need these blocks
            if not bm.allocate(seq, n, cached):
                break
            reserve += future - (len(seq.block_table) - len(cached))
            self.waiting.popleft()
            if seq.first_launch_time is None:  # its step is launched right after this schedule
                seq.first_launch_time = time.perf_counter()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            budget -= n
        out.block_copies, bm.pending_copies = bm.pending_copies, []
        self.num_block_copies += len(out.block_copies)
        return out

    def _future_blocks(self, seq: Sequence, num_have: int) -> int:
        """Blocks seq is expected to add to the num_have it holds: the rest of its prompt plus
        reserve_ratio of its remaining output."""
        p = seq.params
        room = self.max_model_len - len(seq)
        left = room if p.max_tokens is None else min(room, max(0, p.max_tokens - seq.num_output_tokens))
        expected = len(seq) + int(self.reserve_ratio * left + 0.999)
        return max(0, self.block_manager.num_blocks_for(expected) - num_have)

    def _reserved_blocks(self) -> int:
        return sum(self._future_blocks(s, len(s.block_table)) for s in self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free_seq(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _at_limit(self, seq: Sequence, length: int) -> bool:
        """A sequence of this many tokens has all its max_tokens or fills max_model_len."""
        p = seq.params
        return (p.max_tokens is not None and length - seq.num_prompt_tokens >= p.max_tokens) or \
            length >= self.max_model_len

    def advance(self, out: SchedulerOutput) -> None:
        """The step is launched: its tokens count as computed, and each sequence it samples for holds one
        pending token until update() gets it (the next step may be scheduled before that)."""
        for seq, n in zip(out.seqs, out.num_new_tokens):
            if seq.num_computed_tokens + n == len(seq):
                seq.num_pending += 1
            seq.num_computed_tokens += n

    def update(self, out: SchedulerOutput, sampled: list[list[int]], logprobs: list[list] | None = None) -> list[Sequence]:
        """Land a launched step's sampled tokens (one list per seq, empty while a prompt is still being
        prefilled) and their SampleLogprobs (aligned lists; None entries where nobody asked). Returns the
        sequences that got new tokens, forks included."""
        touched = []
        for i, (seq, n, tokens) in enumerate(zip(out.seqs, out.num_new_tokens, sampled)):
            if seq.is_finished:
                continue  # finished or aborted while the step ran: its row is dropped
            if tokens:
                seq.num_pending -= 1
            self.block_manager.cache_full_blocks(seq)
            if not tokens:
                continue
            children = [self._fork(seq, k) for k in range(1, len(tokens))]
            lps = logprobs[i] if logprobs is not None else [None] * len(tokens)
            for s, t, lp in zip([seq, *children], tokens, lps):
                s.append_token(t, lp)
                self._check_stop(s)
                touched.append(s)
        return touched

    def _fork(self, parent: Sequence, index: int) -> Sequence:
        child = parent.fork(index)
        self.block_manager.fork(parent, child)
        self.running.insert(self.running.index(parent) + 1, child)
        return child

    def _check_stop(self, seq: Sequence) -> None:
        p, token = seq.params, seq.token_ids[-1]
        if len(seq.token_ids) - seq.num_prompt_tokens < p.min_tokens:
            if self._at_limit(seq, len(seq.token_ids)):  # min_tokens: no stop token counts before it
                self.finish(seq, "length")
        elif seq.grammar is not None and seq.grammar.is_terminated:  # the grammar's output is complete
            self.finish(seq, "stop")
        elif not p.ignore_eos and token in self.eos_token_ids:
            self.finish(seq, "stop")
        elif token in p.stop_token_ids:
            self.finish(seq, "stop")
        elif self._at_limit(seq, len(seq.token_ids)):  # known tokens only: a later step may hold a pending one
            self.finish(seq, "length")

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.is_finished:
            return
        limit = seq.params.max_tokens or self.max_model_len - seq.num_prompt_tokens
        if reason in ("stop", "length") and self.reserve_ratio > 0 and limit > 0:
            used = min(1.0, (len(seq.token_ids) - seq.num_prompt_tokens) / limit)
            self.reserve_ratio = min(self.config.admission_reserve, 0.9 * self.reserve_ratio + 0.1 * used)
        seq.status = SequenceStatus.FINISHED
        seq.num_pending = 0  # a token still in flight is dropped when its step lands
        seq.finish_reason = reason
        self.block_manager.free_seq(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        seqs = [s for s in [*self.running, *self.waiting] if s.request_id == request_id]
        for seq in seqs:
            self.finish(seq, "abort")
        return seqs
