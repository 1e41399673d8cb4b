"""The sampler's per-request logits processors, batched on the device, in vLLM's order: a grammar's token bitmask
(response_format), min_tokens (EOS and stop_token_ids masked), logit_bias, then the penalties (repetition over
the prompt and the output, frequency and presence over the output). `build_processors` makes them for the rows
of one step that use any; a step in which no request does builds nothing and the sampler does no extra work."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pdcli.engine.sequence import Sequence, SequenceStatus
from pdcli.engine.structured_output import allocate_bitmask, apply_token_bitmask

ToDevice = Callable[[np.ndarray], torch.Tensor]  # host array -> device tensor (pinned, non-blocking)


class PenaltyState:
    """Per sequence with penalties, a slot (row) of two device tensors: its output's token counts and its prompt's
    token set. A slot is filled from the sequence's tokens once (at its first sampling step here: after a fork
    or a P/D handoff too), then each sampled token is scatter-added on the device by `record`: no host loop
    over the vocabulary, no host sync. Slots of finished or handed-off sequences are freed at the next build."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size, self.device = vocab_size, device
        self.counts: torch.Tensor | None = None  # [slots, vocab] int32
        self.prompt_mask: torch.Tensor | None = None  # [slots, vocab] bool
        self.slots: dict[int, tuple[int, Sequence]] = {}  # seq_id -> (slot, seq)
        self.free: list[int] = []

    def slot(self, seq: Sequence, to_device: ToDevice) -> int:
        got = self.slots.get(seq.seq_id)
        if got is not None:
            return got[0]
        if not self.free:
            self._grow()
        s = self.free.pop()
        self.counts[s].zero_()
        self.prompt_mask[s].zero_()
        self.prompt_mask[s, to_device(np.asarray(seq.token_ids[:seq.num_prompt_tokens], dtype=np.int64))] = True
        out = seq.output_token_ids  # landed tokens; a sequence gets its slot before it has one in flight
        if out:
            ids = to_device(np.asarray(out, dtype=np.int64))
            self.counts[s].index_add_(0, ids, torch.ones(len(out), dtype=torch.int32, device=self.device))
        self.slots[seq.seq_id] = (s, seq)
        return s

    def sweep(self) -> None:
        for sid, (s, seq) in list(self.slots.items()):
            if seq.status in (SequenceStatus.FINISHED, SequenceStatus.HANDOFF):
                del self.slots[sid]
                self.free.append(s)

    def _grow(self) -> None:
        old = 0 if self.counts is None else self.counts.shape[0]
        size = max(8, 2 * old)
        counts = torch.zeros(size, self.vocab_size, dtype=torch.int32, device=self.device)
        mask = torch.zeros(size, self.vocab_size, dtype=torch.bool, device=self.device)
        if old:
            counts[:old], mask[:old] = self.counts, self.prompt_mask
        self.counts, self.prompt_mask = counts, mask
        self.free.extend(range(size - 1, old - 1, -1))

    def record(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """counts[slots[i], tokens[i]] += 1 on the device."""
        self.counts.index_put_((slots, tokens), torch.ones_like(slots, dtype=torch.int32), accumulate=True)


@dataclass
class LogitsProcessors:
    """One step's processors; row indices are rows of the sampled logits (a prompt sampling n has n rows)."""
    bitmask: torch.Tensor | None = None  # [G, ceil(V / 32)] int32
    bitmask_rows: torch.Tensor | None = None  # [G]
    banned: torch.Tensor | None = None  # [2, M] (row, token): stop tokens before min_tokens
    bias_at: torch.Tensor | None = None  # [2, B] (row, token)
    bias: torch.Tensor | None = None  # [B] fp32
    penalty_rows: torch.Tensor | None = None  # [P]
    penalty_slots: torch.Tensor | None = None  # [P] slots of PenaltyState
    presence: torch.Tensor | None = None  # [P] fp32
    frequency: torch.Tensor | None = None  # [P] fp32
    repetition: torch.Tensor | None = None  # [P] fp32
    record_rows: torch.Tensor | None = None  # rows whose sampled token joins their sequence's counts
    record_slots: torch.Tensor | None = None
    state: PenaltyState | None = None
    deferred: tuple | None = None  # (grammars, their rows, vocab, to_device): the bitmask, filled by fill_deferred

    def fill_deferred(self) -> None:
        """The grammar rows' bitmask, from their matchers' state now (async scheduling fills it once the step
        before has landed, while this step's forward runs)."""
        if self.deferred is not None:
            grammars, rows, vocab, to_device = self.deferred
            self.deferred = None
            self.bitmask, self.bitmask_rows = _grammar_bitmask(grammars, rows, vocab, to_device)

    def apply(self, logits: torch.Tensor) -> None:
        """In place on fp32 logits [N, V]."""
        if self.bitmask is not None:
            apply_token_bitmask(logits, self.bitmask, self.bitmask_rows)
        if self.banned is not None:
            logits[self.banned[0], self.banned[1]] = float("-inf")
        if self.bias is not None:
            logits.index_put_((self.bias_at[0], self.bias_at[1]), self.bias, accumulate=True)
        if self.penalty_rows is not None:
            logits[self.penalty_rows] = self._penalized(logits[self.penalty_rows])

    def _penalized(self, logits: torch.Tensor) -> torch.Tensor:
        counts = self.state.counts[self.penalty_slots]  # [P, V]
        in_output = counts > 0
        seen = in_output | self.state.prompt_mask[self.penalty_slots]
        rep = self.repetition[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        return logits - self.frequency[:, None] * counts - self.presence[:, None] * in_output

    def record(self, tokens: torch.Tensor) -> None:
        """After sampling: each penalized sequence's new token counts from the next step on."""
        if self.record_rows is not None:
            self.state.record(self.record_slots, tokens[self.record_rows])

    @property
    def has_grammar(self) -> bool:
        return self.bitmask is not None or self.deferred is not None


@dataclass
class _Rows:
    """Host lists for one step's processors."""
    grammar_rows: list
    grammars: list
    banned: list
    bias: list
    penalized: list  # (row, slot, presence, frequency, repetition)
    records: list  # (row, slot)


def _add_seq(acc: _Rows, seq: Sequence, r: int, c: int, vocab: int, eos_token_ids: set[int],
             state: PenaltyState, to_device: ToDevice) -> None:
    """The processors of seq's c sampled rows r .. r + c - 1."""
    p = seq.params
    rows = range(r, r + c)
    if seq.grammar is not None:
        acc.grammar_rows.extend(rows)
        acc.grammars.extend([seq.grammar] * c)
    if seq.num_output_tokens < p.min_tokens:  # the token sampled now is output number num_output_tokens
        stops = (set() if p.ignore_eos else eos_token_ids) | set(p.stop_token_ids)
        acc.banned.extend((row, t) for row in rows for t in stops if t < vocab)
    if p.logit_bias:
        acc.bias.extend((row, t, b) for row in rows for t, b in p.logit_bias.items() if t < vocab)
    if p.needs_penalties:
        slot = state.slot(seq, to_device)
        acc.penalized.extend((row, slot, p.presence_penalty, p.frequency_penalty, p.repetition_penalty) for row in rows)
        acc.records.append((r, slot))  # of n first samples, the parent's own; each fork fills its slot itself


def _grammar_bitmask(grammars: list, rows: list[int], vocab: int, to_device: ToDevice):
    bitmask = allocate_bitmask(len(grammars), vocab)
    for i, g in enumerate(grammars):
        g.fill(bitmask, i)
    return to_device(bitmask.numpy()), to_device(np.asarray(rows))


def build_processors(rows: list[Sequence], counts: list[int], vocab: int, eos_token_ids: set[int],
                     state: PenaltyState, to_device: ToDevice, defer_grammar: bool = False) -> LogitsProcessors | None:
    """The processors of the rows that use any (seq.needs_processing); None when none does. defer_grammar: the
    grammar bitmask is left to `fill_deferred` (the matchers have not seen the step before's tokens yet)."""
    acc = _Rows([], [], [], [], [], [])
    state.sweep()
    r = 0
    for seq, c in zip(rows, counts):
        if seq.needs_processing:
            _add_seq(acc, seq, r, c, vocab, eos_token_ids, state, to_device)
        r += c
    if not (acc.grammars or acc.banned or acc.bias or acc.penalized):
        return None  # logprobs only
    out = LogitsProcessors(state=state)
    if acc.grammars:
        out.deferred = (acc.grammars, acc.grammar_rows, vocab, to_device)
        if not defer_grammar:
            out.fill_deferred()
    if acc.banned:
        out.banned = to_device(np.asarray(acc.banned, dtype=np.int64).T.copy())
    if acc.bias:
        at = np.asarray([(row, t) for row, t, _ in acc.bias], dtype=np.int64)
        out.bias_at, out.bias = to_device(at.T.copy()), to_device(np.asarray([b for *_, b in acc.bias], np.float32))
    if acc.penalized:
        cols = list(zip(*acc.penalized))
        out.penalty_rows, out.penalty_slots = (to_device(np.asarray(x, dtype=np.int64)) for x in cols[:2])
        out.presence, out.frequency, out.repetition = (to_device(np.asarray(x, dtype=np.float32)) for x in cols[2:])
        rec = np.asarray(acc.records, dtype=np.int64).T.copy()
        out.record_rows, out.record_slots = to_device(rec[0]), to_device(rec[1])
    return out
