from __future__ import annotations

from typing import Iterator, Sequence as Seq

from pdcli.config import EngineConfig
from pdcli.engine.llm_engine import LLMEngine
from pdcli.outputs import RequestOutput, StepDelta
from pdcli.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Offline engine: `LLM("smollm2").generate(["Hello"], SamplingParams(temperature=0))`."""

    def __init__(self, model: str = EngineConfig.model, **kwargs):
        self.engine = LLMEngine(EngineConfig.from_kwargs(model, **kwargs))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def stream(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
               chat: bool = False) -> Iterator[StepDelta]:
        """Yield every new token of every request as it is generated; all requests run batched."""
        return self._run(prompts, sampling_params, chat, stream=True)

    def _run(self, prompts, sampling_params, chat: bool, stream: bool) -> Iterator[StepDelta]:
        ids = self.request_ids = self._add(prompts, sampling_params, chat, stream)
        try:
            while self.engine.has_unfinished_requests():
                yield from self.engine.step()
        finally:
            for rid in ids:
                if rid in self.engine.requests and not self.engine.requests[rid].finished:
                    self.engine.abort_request(rid)
        self._outputs = [self.engine.pop_finished(rid) for rid in ids]

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 chat: bool = False) -> list[RequestOutput]:
        for _ in self._run(prompts, sampling_params, chat, stream=False):
            pass
        return self._outputs

    def _add(self, prompts, sampling_params, chat: bool, stream: bool) -> list[str]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling_params)} sampling params")
        for p in prompts:  # validate all before admitting any
            self.engine.validate_prompt(self.engine.encode(p, chat))
        return [self.engine.add_request(p, sp, chat=chat, stream=stream) for p, sp in zip(prompts, sampling_params)]
