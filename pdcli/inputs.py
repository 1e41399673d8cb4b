"""Checks of a prompt's token ids, one implementation for the engine and the server."""
from __future__ import annotations


class PromptError(ValueError):
    pass


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise PromptError(f"token id {bad} is outside the vocabulary (size {vocab_size})")


def check_prompt(ids: list[int], vocab_size: int, max_model_len: int, limit: str = "max_model_len") -> None:
    """limit: what bounds the length (max_model_len, or the KV cache when it is smaller)."""
    if not ids:
        raise PromptError("the prompt is empty")
    if len(ids) >= max_model_len:
        raise PromptError(f"the prompt has {len(ids)} tokens; {limit} allows at most {max_model_len - 1}")
    check_token_ids(ids, vocab_size)
