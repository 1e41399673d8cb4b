import pytest
import torch

from conftest import assert_pool_full
from pdcli import LLM, SamplingParams
from pdcli.engine.sampler import Sampler, SamplingTensors, sample_key
from tiny_models import hf_greedy


def tensors(n, temp=1.0, top_k=None, top_p=1.0, min_p=0.0, vocab=8, keys=None):
    return SamplingTensors(
        temperatures=torch.full((n,), temp), top_k=torch.full((n,), top_k or vocab),
        top_p=torch.full((n,), top_p), min_p=torch.full((n,), min_p),
        keys=torch.tensor(keys if keys is not None else [sample_key(i, 0, 0) for i in range(n)]),
        all_greedy=temp == 0, any_top_k=top_k is not None, any_top_p=top_p < 1, any_min_p=min_p > 0)


def test_sampler_matches_softmax_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5, -3.0, 1.5, 0.2]])
    n = 20000
    sampler = Sampler(8, torch.device("cpu"))
    tokens = sampler(logits.expand(n, 8), tensors(n))
    freq = torch.bincount(tokens, minlength=8).float() / n
    expected = logits[0].softmax(-1)
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)


def test_top_k_top_p_min_p_restrict_support():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5, -3.0, 1.5, 0.2]]).expand(4000, 8)
    sampler = Sampler(8, torch.device("cpu"))
    assert set(sampler(logits, tensors(4000, top_k=2)).tolist()) == {0, 6}
    # top_p 0.5: p(0) = 0.38 < 0.5, adding token 6 (0.23) crosses it
    assert set(sampler(logits, tensors(4000, top_p=0.5)).tolist()) == {0, 6}
    # min_p 0.5: keep tokens with p >= 0.5 * p(0): 0 and 6 (e^1.5 / e^2 = 0.61) only
    assert set(sampler(logits, tensors(4000, min_p=0.5)).tolist()) == {0, 6}
    assert set(sampler(logits, tensors(4000, temp=0)).tolist()) == {0}


def test_a_hash_near_2_to_the_32_never_picks_a_masked_token():
    """Key 4739 hashes token 2982 of a 4096-token vocabulary to 2**32 - 122: as fp32 that rounded up to 2**32, the
    uniform to 1 and its Gumbel noise to +inf, so the token won (NaN against -inf: even where masked)."""
    sampler = Sampler(4096, torch.device("cpu"))
    logits = torch.full((2, 4096), float("-inf"))
    logits[0, 7] = 0.0  # only token 7 allowed
    logits[1] = 0.0
    logits[1, 2982] = -30.0  # all but impossible
    assert sampler(logits, tensors(2, vocab=4096, keys=[4739, 4739])).tolist()[0] == 7
    assert sampler(logits, tensors(2, vocab=4096, keys=[4739, 4739])).tolist()[1] != 2982


def test_sample_key_depends_on_every_field():
    keys = {sample_key(s, i, p) for s in (0, 1, 2**40) for i in (0, 1) for p in (0, 1, 7)}
    assert len(keys) == 18


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("llama-gqa"), device="cpu", max_num_batched_tokens=32, block_size=8, num_kv_blocks=128)


def test_seeded_sampling_reproducible_across_batches(llm, prompts):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate([prompts[0]], p)[0].token_ids
    other = SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True)
    batched = llm.generate([prompts[1], prompts[0], prompts[2]], [other, p, other])[1].token_ids
    assert alone == batched
    assert llm.generate([prompts[0]], SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=24,
                                                      ignore_eos=True))[0].token_ids != alone
    assert_pool_full(llm)


def test_n_greater_than_one_forks_with_copy_on_write(llm, tiny_model_dir, prompts):
    # prompt of 37 tokens: the fork shares a partial block, so every completion's first write copies it
    greedy = llm.generate([prompts[0]], SamplingParams(temperature=0, n=3, max_tokens=16, ignore_eos=True))[0]
    expected = hf_greedy(tiny_model_dir("llama-gqa"), [prompts[0]], 16)[0]
    assert [c.token_ids for c in greedy.outputs] == [expected] * 3
    copies_before = llm.engine.scheduler.num_block_copies
    sampled = llm.generate([prompts[0]], SamplingParams(temperature=1.0, n=4, seed=5, max_tokens=16,
                                                        ignore_eos=True))[0]
    assert [c.index for c in sampled.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in sampled.outputs}) == 4
    assert llm.engine.scheduler.num_block_copies - copies_before >= 3
    again = llm.generate([prompts[0]], SamplingParams(temperature=1.0, n=4, seed=5, max_tokens=16, ignore_eos=True))[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in sampled.outputs]
    assert_pool_full(llm)


def test_stop_token_ids_max_tokens_and_eos(llm, prompts):
    free = llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    stop_at = free.token_ids[5]
    first = free.token_ids.index(stop_at)
    out = llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_at],
                                                    ignore_eos=True))[0]
    assert out.token_ids == free.token_ids[:first + 1] and out.outputs[0].finish_reason == "stop"
    out = llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))[0]
    assert len(out.token_ids) == 7 and out.outputs[0].finish_reason == "length"
    eos = next(iter(llm.engine.scheduler.eos_token_ids))
    llm.engine.scheduler.eos_token_ids.add(stop_at)
    try:
        out = llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=20))[0]
        assert out.token_ids == free.token_ids[:first + 1] and out.outputs[0].finish_reason == "stop"
    finally:
        llm.engine.scheduler.eos_token_ids.discard(stop_at)
    assert eos in llm.engine.scheduler.eos_token_ids
    assert_pool_full(llm)


def test_stop_strings(llm):
    p = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    text = llm.generate(["The capital of France"], p)[0].text
    assert len(text) > 6
    stop = text[3:5]
    out = llm.generate(["The capital of France"], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                                 stop=[stop]))[0]
    assert out.text == text[:text.index(stop)] and out.outputs[0].finish_reason == "stop"
    out = llm.generate(["The capital of France"], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                                 stop=[stop], include_stop_str_in_output=True))[0]
    assert out.text == text[:text.index(stop) + len(stop)]
    assert_pool_full(llm)


def test_streamed_deltas_add_up_to_the_text(llm):
    p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    deltas = list(llm.stream(["Hello world", "How are you"], p))
    outs = llm._outputs
    for rid, out in zip(llm.request_ids, outs):
        assert "".join(d.text for d in deltas if d.request_id == rid) == out.text
        assert [t for d in deltas if d.request_id == rid for t in d.token_ids] == out.token_ids


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(max_tokens=0), dict(top_p=0), dict(top_k=0), dict(n=0),
                                dict(min_p=2), dict(stop=[""])])
def test_sampling_params_validation(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)

