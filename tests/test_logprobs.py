"""Log-probabilities: of the logits the sampler used (after penalties, logit_bias, min_tokens and a grammar's mask;
before temperature, top-k/p and min-p), equal to log-softmax of transformers' logits on a tiny checkpoint; the
same on the P/D path as collocated, with penalties and logprobs."""
import numpy as np
import pytest
import torch

from pdcli import LLM, SamplingParams, StructuredOutputsParams
from pdcli.coordinator.central import CentralScheduler
from pdcli.workers.layout import parse_layout
from test_disagg import ENGINE, wait_pools_full


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return tiny_model_dir("qwen3-gqa")


def hf_logprobs(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_equal_log_softmax_of_transformers_logits(path, prompts, temperature):
    llm = LLM(path, device="cpu", block_size=8, num_kv_blocks=64, max_num_batched_tokens=16)
    k = 5
    out = llm.generate([prompts[0]], SamplingParams(temperature=temperature, top_p=0.9, seed=3, max_tokens=10,
                                                    ignore_eos=True, logprobs=k))[0].outputs[0]
    ref = hf_logprobs(path, prompts[0] + out.token_ids)[len(prompts[0]) - 1:-1]  # [10, V]: the logits of each
    assert len(out.logprobs) == len(out.token_ids) == 10
    got = torch.tensor([lp.logprob for lp in out.logprobs])
    assert torch.allclose(got, ref.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0], atol=1e-4)
    top_lp, top_ids = ref.topk(k, dim=-1)
    assert [list(lp.top_ids) for lp in out.logprobs] == top_ids.tolist()
    assert np.allclose([lp.top_logprobs for lp in out.logprobs], top_lp.numpy(), atol=1e-4)
    if temperature == 0:  # the greedy token is the best one
        assert [lp.top_ids[0] for lp in out.logprobs] == out.token_ids
    none = llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=3, logprobs=0))[0].outputs[0]
    assert all(lp.top_ids == () for lp in none.logprobs)
    assert llm.generate([prompts[0]], SamplingParams(max_tokens=3))[0].outputs[0].logprobs is None


def test_streamed_deltas_carry_their_tokens_logprobs(path, prompts):
    llm = LLM(path, device="cpu", block_size=8, num_kv_blocks=64)
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    deltas = [d for d in llm.stream([prompts[1]], p)]
    whole = llm.generate([prompts[1]], p)[0].outputs[0].logprobs
    assert [lp for d in deltas for lp in d.logprobs] == whole


PD_PARAMS = [
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.4, frequency_penalty=0.7,
                   presence_penalty=0.3, logprobs=3),
    SamplingParams(temperature=0.8, seed=5, max_tokens=12, ignore_eos=True, frequency_penalty=1.5, logprobs=0,
                   logit_bias={7: 3.0}, min_tokens=4),
    SamplingParams(temperature=1.0, seed=9, max_tokens=12, logprobs=1, structured_outputs=StructuredOutputsParams(
        json={"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]})),
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
]


def test_disaggregated_equals_collocated_with_penalties_logprobs_and_grammar(tiny_model_dir, prompts):
    """The prefill worker samples the first token; the decode worker's penalty counts, grammar state and seeds must
    continue from it exactly as a collocated worker does."""
    with CentralScheduler(tiny_model_dir("llama-gqa"), parse_layout("cpu", "cpu", "cpu"), **ENGINE) as cs:
        coll = cs.generate(prompts, PD_PARAMS, mode="collocated", timeout=120)
        disagg = cs.generate(prompts, PD_PARAMS, mode="disaggregated", timeout=120)
        assert [o.error for o in coll + disagg] == [None] * 8
        assert [o.metrics["path"] for o in disagg] == ["disaggregated"] * 4
        assert [o.token_ids for o in coll] == [o.token_ids for o in disagg]
        for a, b in zip(coll, disagg):  # the same rows, batched differently: equal to fp32 rounding
            la, lb = a.outputs[0].logprobs or [], b.outputs[0].logprobs or []
            assert [x.top_ids for x in la] == [x.top_ids for x in lb]
            assert np.allclose([x.logprob for x in la], [x.logprob for x in lb], atol=1e-5)
        assert [len(o.outputs[0].logprobs) for o in disagg[:3]] == [len(o.token_ids) for o in disagg[:3]]
        assert disagg[3].outputs[0].logprobs is None
        assert disagg[2].text == '{"ok": true}' or disagg[2].text == '{"ok": false}'
        stats = wait_pools_full(cs)
        assert all(s["num_free_blocks"] == s["num_blocks"] for s in stats), stats
