"""A checkpoint's tokenizer through `tokenizers` and its chat template through jinja2, as transformers' fast
tokenizers do, without importing transformers (seconds of start-up). `load` takes it where the checkpoint
allows and transformers' AutoTokenizer elsewhere."""
from __future__ import annotations

import json
import os
from datetime import datetime

# tokenizer classes whose transformers wrapper adds nothing to tokenizer.json (else: transformers)
PLAIN_CLASSES = (None, "TokenizersBackend", "PreTrainedTokenizerFast")
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _chat_template(path: str, config: dict) -> str | None:
    file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(file):
        with open(file) as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _compile(template: str):
    """transformers' environment: sandboxed, trim_blocks and lstrip_blocks, loop controls, its tojson,
    raise_exception and strftime_now."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class FastTokenizer:
    def __init__(self, path: str, config: dict, eos_token_ids: tuple[int, ...] = ()):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        self.chat_template = _chat_template(path, config)
        self._compiled = None
        self.special_tokens = {k: _content(config[k]) for k in SPECIAL_KEYS if config.get(k) is not None}
        self.eos_token_ids = set(eos_token_ids)
        eos = self.special_tokens.get("eos_token")
        if eos is not None and self.tok.token_to_id(eos) is not None:
            self.eos_token_ids.add(self.tok.token_to_id(eos))

    @classmethod
    def from_dir(cls, path: str, eos_token_ids: tuple[int, ...] = ()) -> FastTokenizer | None:
        """None where the checkpoint needs transformers' own tokenizer class."""
        cfg_path = os.path.join(path, "tokenizer_config.json")
        if not os.path.isfile(os.path.join(path, "tokenizer.json")) or not os.path.isfile(cfg_path):
            return None
        with open(cfg_path) as f:
            config = json.load(f)
        if config.get("tokenizer_class") not in PLAIN_CLASSES or "add_bos_token" in config or \
                "add_eos_token" in config or config.get("clean_up_tokenization_spaces"):
            return None
        return cls(path, config, eos_token_ids)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not self.chat_template:
            raise ValueError("this model's tokenizer has no chat template")
        if self._compiled is None:
            self._compiled = _compile(self.chat_template)
        text = self._compiled.render(messages=messages, tools=None, documents=None, add_generation_prompt=True,
                                     **self.special_tokens)
        return self.tok.encode(text, add_special_tokens=False).ids
