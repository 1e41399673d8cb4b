"""Token ids -> text, one implementation for the engine, the coordinator, the server and the CLI: the visible
output (no final stop token), incremental decoding in a short window, and stop strings."""
from __future__ import annotations


def ends_on_stop_token(ids: list[int], finish_reason: str | None, eos_token_ids, stop_token_ids=()) -> bool:
    """The output ended on a token that stops it (EOS or one of the request's stop_token_ids)."""
    return finish_reason == "stop" and bool(ids) and (ids[-1] in eos_token_ids or ids[-1] in stop_token_ids)


def visible_token_ids(ids: list[int], finish_reason: str | None, eos_token_ids, stop_token_ids=()) -> list[int]:
    """Output tokens shown as text: all but a final stop token."""
    return ids[:-1] if ends_on_stop_token(ids, finish_reason, eos_token_ids, stop_token_ids) else ids


class DetokenizeWindow:
    """New text as tokens arrive, decoding a short window so multi-token characters and leading spaces come
    out right and each token costs O(1) (vLLM's prefix / read offsets)."""

    def __init__(self, prefix: int = 0, read: int = 0):
        self.prefix, self.read = prefix, read  # token offsets: decoded before the window | up to here

    def step(self, tokenizer, ids: list[int]) -> str:
        """The new whole characters of ids (all tokens so far) since the last call, or ""."""
        before = tokenizer.decode(ids[self.prefix:self.read])
        window = tokenizer.decode(ids[self.prefix:])
        if len(window) > len(before) and not window.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(ids)
            return window[len(before):]
        return ""


def find_stop(text: str, delta: str, stops: list[str]) -> int:
    """Index in text where the earliest stop string that ends inside delta begins, or -1."""
    best = -1
    for s in stops:
        i = text.find(s, max(0, len(text) - len(delta) - len(s) + 1))
        if i >= 0 and (best < 0 or i < best):
            best = i
    return best


def stop_string_end(text: str, delta: str, stops: list[str], include_stop: bool) -> int:
    """Where the output ends if a stop string ends inside the last len(delta) characters of text: before the
    stop string, or after it with include_stop; -1 if none does."""
    i = find_stop(text, delta, stops)
    if i < 0 or not include_stop:
        return i
    return i + len(next(s for s in stops if text.startswith(s, i)))


def cut_at_stop(text: str, stops: list[str], include_stop: bool) -> str:
    """A whole output cut at its first stop string."""
    end = stop_string_end(text, text, stops, include_stop) if stops else -1
    return text if end < 0 else text[:end]
