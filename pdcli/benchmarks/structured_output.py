"""Per-token cost of constrained decoding (response_format): the grammar library's host work per token (xgrammar,
and outlines-core when installed, on the model's vocabulary) and the engine's end to end: a batch decoding JSON
under a schema against the same batch unconstrained for as many tokens. Writes
results/structured_output_<device>.json.

    python -m pdcli.benchmarks.structured_output [--model smollm2] [--device cpu|cuda:0] [--batch 8] [--out results]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from pdcli import LLM, SamplingParams, StructuredOutputsParams
from pdcli.benchmarks.results import provenance, write

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "email": {"type": "string", "maxLength": 40}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                            "maxItems": 3}},
    "required": ["name", "age", "email", "tags"]}
PROMPT = "Describe a fictional person as a JSON object with name, age, email and tags."


def library_costs(llm: LLM, steps: int = 64, walks: int = 8) -> dict:
    """Host microseconds per token: fill the next token's mask and advance by a token it allows (random walks
    over the schema's grammar), xgrammar and, if importable, outlines-core."""
    from pdcli.engine.structured_output import StructuredOutputs

    eng = llm.engine
    so = StructuredOutputs(eng.tokenizer, eng.arch.vocab_size, eng.eos_token_ids)
    params = StructuredOutputsParams(json=SCHEMA)
    began = time.perf_counter()
    so.grammar(params)
    out = dict(xgrammar_first_compile_ms=(time.perf_counter() - began) * 1e3)

    def xgrammar():
        g = so.grammar(params)
        return (lambda mask: g.fill(mask, 0)), g.accept, (lambda: g.is_terminated)

    out.update(_stats("xgrammar", _walk_costs(xgrammar, eng.arch.vocab_size, steps, walks)))
    out.update(_outlines_core(eng, steps, walks))
    return out


def _pick(allowed: torch.Tensor, logits: torch.Tensor, gen: torch.Generator) -> int:
    """A token sampled from fixed random logits restricted to the allowed ones (a stand-in model: it has
    favourite tokens, so strings run long, as a model's do)."""
    noise = -torch.log(-torch.log(torch.rand(len(allowed), generator=gen)))
    return int(allowed[(logits[allowed] + noise).argmax()])


def _stats(prefix: str, costs: list[float]) -> dict:
    costs = sorted(costs)
    return {f"{prefix}_us_per_token": statistics.median(costs) * 1e6, f"{prefix}_mean_us": statistics.mean(costs) * 1e6,
            f"{prefix}_p99_us": costs[int(0.99 * (len(costs) - 1))] * 1e6, f"{prefix}_tokens": len(costs)}


def _allowed(words: torch.Tensor, vocab: int) -> torch.Tensor:
    bits = (words[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:vocab].nonzero()[:, 0]


def _outlines_core(eng, steps: int, walks: int) -> dict:
    """The same walk through outlines-core (its regex of the schema over the byte-level vocabulary)."""
    try:
        import outlines_core as oc
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        return {}
    inner = getattr(eng.tokenizer, "tok", None)
    if inner is None or not hasattr(inner, "get_vocab"):
        return {}
    bytes_of = _byte_decoder()
    eos = min(eng.eos_token_ids)
    vocab = {}
    for tok, i in inner.get_vocab().items():
        if i not in eng.eos_token_ids and i < eng.arch.vocab_size and all(c in bytes_of for c in tok):
            vocab.setdefault(bytes(bytes_of[c] for c in tok), []).append(i)
    began = time.perf_counter()
    index = oc.Index(build_regex_from_schema(json.dumps(SCHEMA)), oc.Vocabulary(eos, vocab))
    out = dict(outlines_core_index_ms=(time.perf_counter() - began) * 1e3)

    def outlines_core():
        guide = oc.Guide(index)
        return (lambda mask: guide.write_mask_into(mask.data_ptr(), mask.numel(), 4)), guide.advance, guide.is_finished

    out.update(_stats("outlines_core", _walk_costs(outlines_core, eng.arch.vocab_size, steps, walks)))
    return out


def _walk_costs(start, vocab: int, steps: int, walks: int) -> list[float]:
    """Host seconds per token (mask fill + advance) of random walks; start() -> (fill(mask), accept(token),
    finished()) of a fresh matcher."""
    from pdcli.engine.structured_output import allocate_bitmask

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(vocab, generator=gen) * 3
    costs = []
    for _ in range(walks):
        (fill, accept, finished), mask = start(), allocate_bitmask(1, vocab)
        for _ in range(steps):
            if finished():
                break
            t0 = time.perf_counter()
            fill(mask)
            t1 = time.perf_counter()
            tok = _pick(_allowed(mask[0], vocab), logits, gen)
            t2 = time.perf_counter()
            accept(tok)
            costs.append((t1 - t0) + (time.perf_counter() - t2))
    return costs


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: character -> byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def timed_generate(llm: LLM, prompts: list, params: list[SamplingParams]) -> tuple[float, list]:
    if llm.engine.device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    outs = llm.generate(prompts, params, chat=bool(llm.engine.tokenizer.chat_template))  # dummy:<preset>: bytes
    if llm.engine.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began, outs


def engine_costs(llm: LLM, batch: int, repeats: int) -> dict:
    """ms per decode step and per output token, constrained vs unconstrained for the same token counts."""
    prompts = [PROMPT] * batch
    fmt = StructuredOutputsParams(json=SCHEMA)
    con = [SamplingParams(temperature=1.0, seed=i, max_tokens=160, structured_outputs=fmt) for i in range(batch)]
    timed_generate(llm, prompts[:2], con[:2])  # compile, warm up
    rows = []
    for _ in range(repeats):
        t_con, outs = timed_generate(llm, prompts, con)
        lens = [len(o.token_ids) for o in outs]
        free = [SamplingParams(temperature=1.0, seed=i, max_tokens=n, ignore_eos=True) for i, n in enumerate(lens)]
        t_free, _ = timed_generate(llm, prompts, free)
        valid = sum(_valid(o.text) for o in outs)
        rows.append(dict(constrained_s=t_con, unconstrained_s=t_free, steps=max(lens), tokens=sum(lens), valid=valid))
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    steps, tokens = med("steps"), med("tokens")
    return dict(batch=batch, runs=rows, constrained_ms_per_step=med("constrained_s") * 1e3 / steps,
                unconstrained_ms_per_step=med("unconstrained_s") * 1e3 / steps,
                overhead_ms_per_step=(med("constrained_s") - med("unconstrained_s")) * 1e3 / steps,
                overhead_ms_per_token=(med("constrained_s") - med("unconstrained_s")) * 1e3 / tokens,
                valid=sum(r["valid"] for r in rows), completions=batch * repeats)


def _valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):  # not JSON, or not the schema
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    from pdcli.benchmarks.device import device_slug

    llm = LLM(args.model, device=args.device)
    lib = library_costs(llm)
    print(json.dumps(lib), flush=True)
    eng = engine_costs(llm, args.batch, args.repeats)
    print(json.dumps({k: v for k, v in eng.items() if k != "runs"}), flush=True)
    slug = device_slug() if llm.engine.device.type == "cuda" else "cpu"
    res = dict(model=args.model, device=str(llm.engine.device), schema=SCHEMA, library=lib, engine=eng,
               async_scheduling=llm.engine.async_scheduling, provenance=provenance("pdcli.benchmarks.structured_output", argv))
    print(f"wrote {write(args.out, f'structured_output_{slug}', res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
