"""Output assembly: a tracked request's tokens -> `RequestOutput` (the final stop token dropped, text cut at
its first stop string), and `TextStream`, one completion's text as it streams (server, `generate --mode`)."""
from __future__ import annotations

from pdcli.coordinator.tracked import Tracked
from pdcli.engine.detokenizer import DetokenizeWindow, cut_at_stop, visible_token_ids
from pdcli.outputs import CompletionOutput, RequestOutput


class OutputAssembler:
    def __init__(self, tokenizer, eos_token_ids: set[int]):
        self.tokenizer, self.eos_token_ids = tokenizer, eos_token_ids

    def visible(self, t: Tracked, index: int, reason: str | None) -> list[int]:
        """Completion index's tokens shown as text: all but a final stop token."""
        return visible_token_ids(t.tokens.get(index, []), reason, self.eos_token_ids, t.params.stop_token_ids)

    def text(self, t: Tracked, ids: list[int]) -> str:
        """Decoded output, cut at the first stop string (the worker stopped on it) after the min_tokens first."""
        p = t.params
        text = self.tokenizer.decode(ids)
        head = len(self.tokenizer.decode(ids[:p.min_tokens])) if p.min_tokens and p.stop else 0
        return text[:head] + cut_at_stop(text[head:], p.stop, p.include_stop_str_in_output)

    def output(self, t: Tracked) -> RequestOutput:
        outs = []
        for i in range(max(1, t.params.n)):
            reason = t.finish.get(i, "error" if t.error else None)
            lps = t.logprobs.get(i, []) if t.params.logprobs is not None else None
            outs.append(CompletionOutput(i, self.text(t, self.visible(t, i, reason)), t.tokens.get(i, []), reason, lps))
        return RequestOutput(t.rid, None, t.prompt_ids, outs, t.done.is_set(), error=t.error,
                             metrics=dict(arrival_time=t.arrival, first_token_time=t.first_token_time,
                                          finished_time=t.finish_time, path=t.path, decision=t.decision,
                                          transfer_bytes=t.transfer_bytes, transfer_s=t.transfer_s,
                                          transfer_kind=t.transfer_kind))


class TextStream:
    """One completion's text as it streams: new tokens decoded in a short window (O(1) per token), the whole
    output once at the end (cut at a stop string), so the deltas add up to the non-streaming text."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer, self.stop = tokenizer, stop or []
        self.window = DetokenizeWindow()
        self.text = ""  # decoded so far
        self.sent = ""  # streamed so far

    def update(self, ids: list[int], final_text: str | None = None) -> str:
        """ids: the visible tokens so far; final_text: the whole output once it has finished. The new text to
        stream ("" while it is held back: an incomplete character, a possible stop string)."""
        if final_text is not None:
            text = final_text
        else:
            self.text += self.window.step(self.tokenizer, ids)
            text = self.text
            if self.stop:  # hold back what may start a stop string
                hold = max(map(len, self.stop)) - 1
                text = text[:max(len(self.sent), len(text) - hold)]
        new = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent = text
        return new
