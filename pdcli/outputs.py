from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SampleLogprob:
    """One sampled token's log-probability and its top alternatives', from the logits the sampler used: after
    penalties, logit_bias, min_tokens and a grammar's mask, before temperature, top-k, top-p and min-p."""
    logprob: float
    top_ids: tuple[int, ...] = ()  # best first; as many as the request's logprobs
    top_logprobs: tuple[float, ...] = ()


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # stop | length | abort | error
    logprobs: list[SampleLogprob] | None = None  # one per token of token_ids, when the request asked


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    error: str | None = None  # why the request ended without output (finish_reason "error")
    metrics: dict = field(default_factory=dict)  # arrival_time, first_token_time, finished_time (perf_counter s)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids


@dataclass
class StepDelta:
    """What one engine step added to one completion (for streaming)."""
    request_id: str
    index: int
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None = None
    logprobs: list[SampleLogprob] | None = None  # one per token of token_ids, when the request asked
