from __future__ import annotations

import json
from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # top alternatives a request may ask for (vLLM's default max_logprobs)


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Constrained decoding (vLLM's name): the output is a JSON value of `json` (a JSON schema, as a dict or
    its text), or, with json_object, any JSON object."""
    json: dict | str | None = None
    json_object: bool = False

    def __post_init__(self):
        if (self.json is None) == (not self.json_object):
            raise ValueError("structured outputs need exactly one of json (a schema) or json_object")
        if isinstance(self.json, str):
            try:
                json.loads(self.json)
            except json.JSONDecodeError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None

    @property
    def key(self) -> str:
        """Identifies the grammar (compiled once per key)."""
        if self.json_object:
            return "json_object"
        return self.json if isinstance(self.json, str) else json.dumps(self.json, sort_keys=True)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0: greedy
    top_k: int = -1  # -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None  # same seed, same output, whatever the batch
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens are out
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0  # subtracted from the logit of every token the output holds
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the output
    repetition_penalty: float = 1.0  # vLLM's: logits of tokens in the prompt or output divided (> 0) or multiplied
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    logprobs: int | None = None  # None: none; k: the sampled token's log-probability and the top k alternatives'
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be a positive integer, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        self._check_penalties()
        self._check_extras()

    def _check_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or any(
                    not isinstance(k, int) or k < 0 or not -100.0 <= v <= 100.0 for k, v in self.logit_bias.items()):
                raise ValueError("logit_bias must map token ids (>= 0) to biases in [-100, 100]")

    def _check_extras(self) -> None:
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be a non-negative integer, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be at most max_tokens ({self.max_tokens})")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def needs_processing(self) -> bool:
        """Anything beyond temperature / top-k / top-p / min-p: the sampler's extra work for this request."""
        return self.needs_penalties or bool(self.logit_bias) or self.min_tokens > 0 or self.logprobs is not None \
            or self.structured_outputs is not None
