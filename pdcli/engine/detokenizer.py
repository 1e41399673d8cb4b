from __future__ import annotations

from pdcli.engine.sequence import Sequence


def detokenize_step(tokenizer, seq: Sequence) -> str:
    """New text since the last call, decoding a short window so multi-token characters and
    leading spaces come out right (vLLM's prefix/read offsets)."""
    if seq.detok_state is None:
        seq.detok_state = (max(seq.num_prompt_tokens - 5, 0), seq.num_prompt_tokens)
    prefix, read = seq.detok_state
    ids = seq.token_ids
    prefix_text = tokenizer.decode(ids[prefix:read])
    new_text = tokenizer.decode(ids[prefix:])
    if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
        seq.detok_state = (read, len(ids))
        return new_text[len(prefix_text):]
    return ""


def find_stop(text: str, delta: str, stops: list[str]) -> int:
    """Index in text where the earliest stop string that ends inside delta begins, or -1."""
    best = -1
    for s in stops:
        i = text.find(s, max(0, len(text) - len(delta) - len(s) + 1))
        if i >= 0 and (best < 0 or i < best):
            best = i
    return best
