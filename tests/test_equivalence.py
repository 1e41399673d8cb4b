"""Greedy tokens from LLM.generate equal HF transformers' own greedy generate (acceptance 1, 2)."""
import pytest

from conftest import assert_pool_full
from pdcli import LLM, SamplingParams
from tiny_models import VARIANTS, hf_greedy

NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, prompts):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = hf_greedy(tiny_model_dir(name), prompts, NEW_TOKENS)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(VARIANTS))
def test_chunked_prefill_matches_hf(name, tiny_model_dir, prompts, reference):
    # budget 16 < every prompt but one: prompts of 37/61 tokens take 3/4 chunks, mixed with decodes
    llm = LLM(tiny_model_dir(name), device="cpu", max_num_batched_tokens=16, block_size=8, num_kv_blocks=64)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == reference(name)
    assert max(-(-len(p) // 16) for p in prompts) >= 3
    assert_pool_full(llm)


@pytest.mark.parametrize("name", ["llama-gqa", "qwen3-gqa"])
def test_preemption_matches_hf(name, tiny_model_dir, prompts, reference):
    # 14 blocks of 8 tokens hold at most ~1.2 of these sequences at once: admitted greedily (no
    # admission reserve), running ones get preempted
    llm = LLM(tiny_model_dir(name), device="cpu", max_num_batched_tokens=32, block_size=8, num_kv_blocks=14,
              admission_reserve=0.0)
    outs = llm.generate(prompts, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == reference(name)
    assert_pool_full(llm)


def test_admission_reserve_avoids_preemption(tiny_model_dir, prompts, reference):
    # the same tight pool: admitting only what the running sequences leave room for preempts nothing
    llm = LLM(tiny_model_dir("llama-gqa"), device="cpu", max_num_batched_tokens=32, block_size=8, num_kv_blocks=14)
    outs = llm.generate(prompts, GREEDY)
    assert llm.engine.scheduler.num_preemptions == 0
    assert [o.token_ids for o in outs] == reference("llama-gqa")
    assert_pool_full(llm)


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-gqa-tied"])
def test_prefix_caching_same_tokens_and_hits(name, tiny_model_dir, prompts, reference):
    on = LLM(tiny_model_dir(name), device="cpu", max_num_batched_tokens=24, block_size=8, num_kv_blocks=64)
    off = LLM(tiny_model_dir(name), device="cpu", max_num_batched_tokens=24, block_size=8, num_kv_blocks=64,
              enable_prefix_caching=False)
    first = on.generate(prompts, GREEDY)
    assert [o.token_ids for o in first] == [o.token_ids for o in off.generate(prompts, GREEDY)] == reference(name)
    hits_before = on.engine.block_manager.num_prefix_hits
    again = on.generate([prompts[2]], GREEDY)[0]
    assert again.token_ids == reference(name)[2]
    assert again.num_cached_tokens == (len(prompts[2]) - 1) // 8 * 8
    assert on.engine.block_manager.num_prefix_hits - hits_before == (len(prompts[2]) - 1) // 8
    assert off.engine.block_manager.num_prefix_hits == 0
    assert_pool_full(on)
    assert_pool_full(off)
