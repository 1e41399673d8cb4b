"""response_format through xgrammar: the token bitmask applied on the device equals xgrammar's own, and sampled
completions at temperature 1 all parse and validate (SmolLM2, the default model, with its real tokenizer)."""
import json

import pytest
import torch

from pdcli import LLM, SamplingParams, StructuredOutputsParams
from pdcli.benchmarks.structured_output import SCHEMA
from pdcli.engine.structured_output import allocate_bitmask, apply_token_bitmask, check_schema

jsonschema = pytest.importorskip("jsonschema")  # a test extra; a GPU machine may lack it

BOOL_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


def test_bitmask_on_the_logits_equals_xgrammars():
    import xgrammar as xgr

    torch.manual_seed(0)
    vocab, rows = 1000, torch.tensor([0, 2])
    bitmask = torch.randint(-2**31, 2**31 - 1, (2, (vocab + 31) // 32), dtype=torch.int32)
    logits = torch.randn(3, vocab)
    got, want = logits.clone(), logits.clone()
    apply_token_bitmask(got, bitmask, rows)
    full = allocate_bitmask(3, vocab)  # xgrammar's: a row per logits row
    full[rows] = bitmask
    xgr.apply_token_bitmask_inplace(want, full, vocab_size=vocab, indices=[0, 2])
    assert torch.equal(got, want) and torch.equal(got[1], logits[1])
    assert torch.equal(allocate_bitmask(1, 40), torch.full((1, 2), -1, dtype=torch.int32))


@pytest.fixture(scope="module")
def smollm2():
    return LLM("smollm2", device="cpu", num_kv_blocks=512, max_num_seqs=32)


def _ask(llm, fmt, n=20, max_tokens=200):
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens, structured_outputs=fmt) for i in range(n)]
    prompt = 'Reply with a JSON object only, like {"name": "Ann", "age": 31, "email": "ann@x.org", "tags": ["a"]}, ' \
             'for a fictional person.'
    return llm.generate([prompt] * n, params, chat=True)


def test_20_completions_at_temperature_1_match_the_schema(smollm2):
    outs = _ask(smollm2, StructuredOutputsParams(json=SCHEMA))
    for o in outs:
        assert o.outputs[0].finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), SCHEMA)
    assert len({o.text for o in outs}) > 10  # sampled, not one answer


def test_20_json_object_completions_parse(smollm2):
    """Any object: its strings and keys are free, so a 135M model at temperature 1 may write a long one (287 tokens
    at most on this prompt and these seeds): the budget is a client's usual, not the schema test's 200."""
    outs = _ask(smollm2, StructuredOutputsParams(json_object=True), max_tokens=600)
    for o in outs:
        assert o.outputs[0].finish_reason == "stop", o.text
        assert isinstance(json.loads(o.text), dict)


def test_grammar_rows_beside_free_ones_async_and_forked(tiny_model_dir, prompts):
    """A random tiny model can only finish the boolean schema: with async scheduling (a step with a grammar row lands
    before the next is launched), n = 3 and a free row in the same batch."""
    llm = LLM(tiny_model_dir("llama-gqa"), device="cpu", block_size=8, num_kv_blocks=128, async_scheduling=True)
    fmt = StructuredOutputsParams(json=BOOL_SCHEMA)
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(prompts[:2], [SamplingParams(temperature=1.0, seed=1, n=3, max_tokens=20,
                                                     structured_outputs=fmt), free])
    assert sorted(json.loads(c.text)["ok"] in (True, False) for c in outs[0].outputs) == [True] * 3
    alone = LLM(tiny_model_dir("llama-gqa"), device="cpu", block_size=8, num_kv_blocks=128)
    assert outs[1].token_ids == alone.generate([prompts[1]], free)[0].token_ids


def test_a_schema_xgrammar_cannot_compile_is_refused():
    with pytest.raises(ValueError, match="unsupported JSON schema"):
        check_schema(StructuredOutputsParams(json={"type": "objectx"}))
    with pytest.raises(ValueError):
        StructuredOutputsParams(json="{not json")
    with pytest.raises(ValueError):
        StructuredOutputsParams()


def test_async_grammar_steps_overlap_the_forward_and_sample_as_sync_ones(tiny_model_dir, prompts):
    """With async scheduling a grammar step's forward pass is launched while the step before is still in flight;
    its bitmask is filled once that step has landed. Seeded sampling then gives the synchronous loop's tokens."""
    fmt = StructuredOutputsParams(json=BOOL_SCHEMA)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=20, structured_outputs=fmt) for s in (1, 2)] + \
        [SamplingParams(temperature=0.8, seed=3, max_tokens=12, ignore_eos=True)]
    kw = dict(device="cpu", block_size=8, num_kv_blocks=128)
    sync = LLM(tiny_model_dir("llama-gqa"), async_scheduling=False, **kw).generate(prompts[:3], params)
    llm = LLM(tiny_model_dir("llama-gqa"), async_scheduling=True, **kw)
    engine, forward = llm.engine, llm.engine.runner.launch_forward
    overlapped = []

    def spy(out, defer_grammar=False):
        overlapped.append(engine._inflight is not None and defer_grammar)
        return forward(out, defer_grammar)

    engine.runner.launch_forward = spy
    outs = llm.generate(prompts[:3], params)
    assert sum(overlapped) >= 5
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in sync]
    assert all(json.loads(o.text)["ok"] in (True, False) for o in outs[:2])
