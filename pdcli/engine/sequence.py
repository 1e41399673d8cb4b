from __future__ import annotations

import copy
import enum
import itertools
import time

from pdcli.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    HANDOFF = enum.auto()  # KV held for a transfer between prefill and decode workers, not scheduled
    FINISHED = enum.auto()


class Sequence:
    """One token stream. A request with n > 1 forks into n sequences after its prompt."""

    counter = itertools.count()

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, seed: int):
        self.seq_id = next(Sequence.counter)
        self.request_id = request_id
        self.index = 0  # which of the request's n completions
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose KV is in the cache (or being written by a launched step)
        self.num_pending = 0  # sampled tokens still on the GPU: launched, not yet in token_ids (0 or 1)
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at admission
        self.block_table: list[int] = []
        self.status = SequenceStatus.WAITING
        self.params = params
        self.seed = seed
        self.finish_reason: str | None = None
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.first_launch_time: float | None = None  # perf_counter s when a step with its first prompt tokens was
        # scheduled, its launch right after (a launch-bound step's host launch counts as its compute, not as a wait)
        self.num_preemptions = 0
        self.handoff_after_prefill = False  # P/D: its KV goes to a decode worker once the first token is sampled
        self.text = ""  # detokenized output, stop strings removed
        self.detok = None  # DetokenizeWindow, while streaming
        self.needs_processing = params.needs_processing  # penalties, logit_bias, min_tokens, logprobs, a grammar
        self.grammar = None  # structured_output.Grammar, for response_format
        self.logprobs: list | None = [] if params.logprobs is not None else None  # SampleLogprob per output token

    def __len__(self) -> int:
        """Tokens including the pending one: the length the scheduler plans with."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        """Output tokens including the pending one."""
        return len(self) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_samples(self) -> int:
        """Tokens to sample when this step completes the prompt: n for a request not yet forked."""
        return self.params.n if self.index == 0 and self.num_output_tokens == 0 else 1

    def fork(self, index: int) -> "Sequence":
        child = copy.copy(self)
        child.seq_id = next(Sequence.counter)
        child.index = index
        child.token_ids = list(self.token_ids)
        child.block_table = list(self.block_table)
        if self.logprobs is not None:
            child.logprobs = list(self.logprobs)
        if self.grammar is not None:
            child.grammar = self.grammar.fork(child.output_token_ids)
        return child

    def append_token(self, token_id: int, logprob=None) -> None:
        self.token_ids.append(token_id)
        if self.grammar is not None:
            self.grammar.accept(token_id)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
