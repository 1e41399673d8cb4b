"""Constrained decoding for `response_format` (json_object, json_schema) through xgrammar: the model's vocabulary
described once per engine (`tokenizer_info`), a grammar compiled once per schema, one `GrammarMatcher` per
sequence. Each step the matchers of the rows that sample fill a token bitmask on the host; it goes to the
device with the step's other sampling tensors and `apply_token_bitmask` masks the logits, batched.

xgrammar, not outlines-core: on SmolLM2's 49,152-token vocabulary a token's mask plus its advance cost 6 us on
average (p99 16 us), outlines-core's 111 us (p99 507 us: its masks grow with the allowed tokens), and xgrammar
has a JSON grammar of its own for json_object (results/structured_output_cpu.json; README, Serve)."""
from __future__ import annotations

import json
import logging

import torch

from pdcli.sampling_params import StructuredOutputsParams

logger = logging.getLogger("pdcli.engine.structured_output")

MAX_COMPILED = 64  # grammars kept compiled per engine (least recently used dropped)


def check_schema(params: StructuredOutputsParams) -> None:
    """ValueError naming what is wrong with a JSON schema xgrammar cannot turn into a grammar."""
    import xgrammar as xgr

    if params.json_object:
        return
    try:
        xgr.Grammar.from_json_schema(_schema_text(params))
    except RuntimeError as e:
        raise ValueError(f"unsupported JSON schema: {str(e).split(': ', 1)[-1].strip()}") from None


def _schema_text(params: StructuredOutputsParams) -> str:
    return params.json if isinstance(params.json, str) else json.dumps(params.json)


def _vocab_type(backend_json: str):
    """tokenizers' serialized tokenizer -> (xgrammar VocabType, add_prefix_space)."""
    import xgrammar as xgr

    cfg = json.loads(backend_json)

    def types(node) -> set[str]:
        if not isinstance(node, dict):
            return set()
        return {node.get("type")} | {t for sub in node.get("decoders") or node.get("pretokenizers") or []
                                     for t in types(sub)}

    decoders = types(cfg.get("decoder"))
    if "ByteLevel" in decoders:
        return xgr.VocabType.BYTE_LEVEL, False
    if "ByteFallback" in decoders:
        pre = types(cfg.get("pre_tokenizer")) | types(cfg.get("normalizer"))
        return xgr.VocabType.BYTE_FALLBACK, bool(pre & {"Metaspace", "Prepend"})
    return xgr.VocabType.RAW, False


def tokenizer_info(tokenizer, vocab_size: int, stop_token_ids: set[int]):
    """The model's vocabulary as xgrammar sees it: an HF tokenizer, a `tokenizers` one (FastTokenizer) or bytes."""
    import xgrammar as xgr

    stops = sorted(stop_token_ids) or None
    inner = getattr(tokenizer, "tok", None)
    if inner is not None and hasattr(inner, "backend_tokenizer"):  # transformers
        return xgr.TokenizerInfo.from_huggingface(inner, vocab_size=vocab_size, stop_token_ids=stops)
    if inner is not None:  # tokenizers.Tokenizer
        encoded = [""] * vocab_size  # "": an id the tokenizer lacks, never allowed
        for token, i in inner.get_vocab(with_added_tokens=True).items():
            if i < vocab_size:
                encoded[i] = token
        kind, prefix = _vocab_type(inner.to_str())
        return xgr.TokenizerInfo(encoded, kind, vocab_size=vocab_size, stop_token_ids=stops, add_prefix_space=prefix)
    encoded = [bytes([i]) if i < 256 else "" for i in range(vocab_size)]  # ByteTokenizer: ids < 256 are bytes
    return xgr.TokenizerInfo(encoded, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stops)


class Grammar:
    """One sequence's matcher: the tokens it may sample next, advanced by each token it got."""

    def __init__(self, compiled):
        import xgrammar as xgr

        self.compiled = compiled
        self.matcher = xgr.GrammarMatcher(compiled)

    def accept(self, token_id: int) -> None:
        if not self.matcher.is_terminated() and not self.matcher.accept_token(token_id):
            logger.warning("token %d is outside the grammar", token_id)

    @property
    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()

    def fork(self, output_token_ids: list[int]) -> "Grammar":
        g = Grammar(self.compiled)
        for t in output_token_ids:
            g.accept(t)
        return g

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        if self.matcher.is_terminated():
            bitmask[row] = -1  # a finished grammar constrains nothing (the sequence stops on this step's token)
        else:
            self.matcher.fill_next_token_bitmask(bitmask, row)


class StructuredOutputs:
    """An engine's grammar compiler (built on first use: the vocabulary is scanned once) and compiled grammars."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int]):
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, stop_token_ids
        self._compiler = None
        self._compiled: dict[str, object] = {}

    def grammar(self, params: StructuredOutputsParams) -> Grammar:
        """A new matcher for params' grammar; ValueError for a schema xgrammar cannot compile."""
        compiled = self._compiled.pop(params.key, None) or self._compile(params)
        self._compiled[params.key] = compiled  # most recently used last
        while len(self._compiled) > MAX_COMPILED:
            self._compiled.pop(next(iter(self._compiled)))
        return Grammar(compiled)

    def _compile(self, params: StructuredOutputsParams):
        import xgrammar as xgr

        if self._compiler is None:
            info = tokenizer_info(self.tokenizer, self.vocab_size, self.stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        # compact JSON (", " and ": " as separators): a small model cannot pad it with whitespace forever
        try:
            if params.json_object:
                return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                          strict_mode=False)
            return self._compiler.compile_json_schema(_schema_text(params), any_whitespace=False)
        except RuntimeError as e:
            raise ValueError(f"unsupported JSON schema: {str(e).split(': ', 1)[-1].strip()}") from None


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """[rows, ceil(vocab / 32)] int32, every token allowed; bit j of word w stands for token 32 w + j."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """logits[rows[i], t] = -inf where bit t of bitmask[i] is 0; in place, on logits' device."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)[:, :logits.shape[1]]  # [G, V]
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
