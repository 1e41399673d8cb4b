from __future__ import annotations


class ByteTokenizer:
    """Bytes as token ids, for dummy models that ship no tokenizer."""

    chat_template = None

    def __init__(self, eos_token_ids: tuple[int, ...] = ()):
        self.eos_token_ids = set(eos_token_ids)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        raise ValueError("this model has no chat template")


class HFTokenizer:
    """A transformers tokenizer (tokenizer files of an HF checkpoint, or the vocab inside a GGUF)."""

    def __init__(self, tok, eos_token_ids: tuple[int, ...] = ()):
        self.tok = tok
        self.chat_template = getattr(tok, "chat_template", None)
        self.eos_token_ids = set(eos_token_ids)
        if tok.eos_token_id is not None:
            self.eos_token_ids.add(tok.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not self.chat_template:
            raise ValueError("this model's tokenizer has no chat template")
        ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)


def eos_token_ids(arch, tokenizer) -> set[int]:
    """The tokens that end a request (unless ignore_eos): the model config's and the tokenizer's."""
    return set(arch.eos_token_ids) | set(getattr(tokenizer, "eos_token_ids", ()))
