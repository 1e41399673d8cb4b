"""Penalties (presence, frequency, repetition), logit_bias, min_tokens and stop_token_ids: batched on the device,
equal to a torch reference on a tiny checkpoint, the same with async scheduling, preemption and n > 1; a batch
that uses none of them builds nothing."""
import numpy as np
import pytest
import torch

from conftest import assert_pool_full
from pdcli import LLM, SamplingParams
from pdcli.engine.logits_processors import PenaltyState, build_processors
from pdcli.engine.sequence import Sequence

EOS = 2  # the tiny checkpoints' eos_token_id


def ref_process(logits, prompt, output, p: SamplingParams, eos=(EOS,)):
    """The torch reference of one row: min_tokens, logit_bias, then vLLM's penalties (repetition over prompt and
    output, frequency and presence over the output)."""
    logits = logits.clone().float()
    vocab = logits.shape[-1]
    if len(output) < p.min_tokens:
        for t in ({*([] if p.ignore_eos else eos), *p.stop_token_ids}):
            logits[t] = float("-inf")
    for t, b in (p.logit_bias or {}).items():
        logits[t] += b
    counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=vocab).float()
    seen = counts > 0
    seen[torch.tensor(prompt)] = True
    logits = torch.where(seen, torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty),
                         logits)
    return logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)


def hf_reference(path, prompt, p: SamplingParams, steps: int):
    """Greedy tokens and their log-probabilities (of the processed logits) from transformers' logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    out, lps = [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([prompt + out])).logits[0, -1]
            proc = ref_process(logits, prompt, out, p)
            tok = int(proc.argmax())
            lps.append(float(proc.log_softmax(-1)[tok]))
            out.append(tok)
    return out, lps


PARAMS = [
    SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, repetition_penalty=1.6),
    SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, frequency_penalty=1.2, presence_penalty=0.8),
    SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, presence_penalty=-0.5, repetition_penalty=0.8,
                   logit_bias={17: 2.5, 51: -100.0}),
]


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return tiny_model_dir("llama-gqa")


@pytest.fixture(scope="module")
def llm(path):
    return LLM(path, device="cpu", max_num_batched_tokens=32, block_size=8, num_kv_blocks=128)


def test_processors_equal_the_reference_per_row():
    """Rows with and without processors, a prompt sampling n = 2 (two rows, one slot), random logits."""
    torch.manual_seed(0)
    vocab = 64
    ps = [PARAMS[0], SamplingParams(), PARAMS[1], PARAMS[2],
          SamplingParams(min_tokens=3, stop_token_ids=[5], logit_bias={EOS: 9.0, 5: 9.0}, n=2)]
    seqs = []
    for i, p in enumerate(ps):
        seq = Sequence(str(i), [3 + i, 9, 9, 40 + i], p, seed=0)
        for t in ([7, 7, 8] if i != 4 else []):
            seq.append_token(t)
        seqs.append(seq)
    counts = [s.num_samples for s in seqs]
    state = PenaltyState(vocab, torch.device("cpu"))
    proc = build_processors(seqs, counts, vocab, {EOS}, state, torch.from_numpy)
    logits = torch.randn(sum(counts), vocab) * 3
    got = logits.clone()
    proc.apply(got)
    rows = [s for s, c in zip(seqs, counts) for _ in range(c)]
    want = torch.stack([ref_process(logits[i], s.token_ids[:4], s.output_token_ids, s.params)
                        for i, s in enumerate(rows)])
    assert torch.allclose(got, want, atol=1e-6)
    proc.record(torch.tensor([7, 1, 9, 1, 3, 4]))  # a token counts in its own sequence's slot from the next step
    slot = state.slots[seqs[0].seq_id][0]
    assert state.counts[slot, 7] == 3 and state.counts[slot, 8] == 1


def test_greedy_with_penalties_equals_the_torch_reference(llm, path, prompts):
    outs = llm.generate([prompts[0]] * len(PARAMS), [SamplingParams(**{**p.__dict__, "logprobs": 0}) for p in PARAMS])
    for p, o in zip(PARAMS, outs):
        want, lps = hf_reference(path, prompts[0], p, 14)
        assert o.token_ids == want
        assert np.allclose([x.logprob for x in o.outputs[0].logprobs], lps, atol=1e-4)
    plain = llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=14, ignore_eos=True))[0].token_ids
    assert all(o.token_ids != plain for o in outs)  # each penalty changed the output
    assert_pool_full(llm)


def test_penalties_batched_async_preempted_and_forked_give_the_same_tokens(path, prompts):
    """A mixed batch (penalized rows beside plain ones) with async scheduling and a pool so small that sequences
    are preempted and recomputed, and n = 2 greedy: every completion as alone and synchronous."""
    alone = LLM(path, device="cpu", block_size=8, num_kv_blocks=128)
    want = [alone.generate([q], p)[0].token_ids for q, p in zip(prompts[:3], PARAMS)]
    plain = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    want_plain = alone.generate([prompts[3]], plain)[0].token_ids
    tight = LLM(path, device="cpu", block_size=8, num_kv_blocks=20, max_num_batched_tokens=16, async_scheduling=True,
                admission_reserve=0.0, enable_prefix_caching=False)
    outs = tight.generate([*prompts[:3], prompts[3]], [*PARAMS, plain])
    assert [o.token_ids for o in outs] == [*want, want_plain]
    assert tight.engine.scheduler.num_preemptions > 0
    forked = alone.generate([prompts[1]], SamplingParams(**{**PARAMS[1].__dict__, "n": 2}))[0]
    assert [c.token_ids for c in forked.outputs] == [want[1]] * 2
    assert_pool_full(tight)
    assert_pool_full(alone)


def test_min_tokens_masks_eos_and_stop_token_ids(llm, prompts):
    eos_first = SamplingParams(temperature=0, max_tokens=12, logit_bias={EOS: 100.0})
    assert llm.generate([prompts[1]], eos_first)[0].token_ids == [EOS]
    out = llm.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=12, logit_bias={EOS: 100.0},
                                                    min_tokens=5))[0].outputs[0]
    assert len(out.token_ids) == 6 and EOS not in out.token_ids[:5] and out.token_ids[5] == EOS
    assert out.finish_reason == "stop"
    stop = llm.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=12, logit_bias={42: 100.0},
                                                     stop_token_ids=[42], min_tokens=3, ignore_eos=True))[0]
    assert len(stop.token_ids) == 4 and 42 not in stop.token_ids[:3] and stop.token_ids[3] == 42


def test_seeded_sampling_with_penalties_is_reproducible(llm, prompts):
    p = SamplingParams(temperature=0.3, seed=11, max_tokens=16, ignore_eos=True, frequency_penalty=1.0,
                       presence_penalty=0.5, repetition_penalty=1.2)
    a = llm.generate([prompts[2]], p)[0].token_ids
    b = llm.generate([prompts[0], prompts[2]], [SamplingParams(max_tokens=5), p])[1].token_ids
    assert a == b
    plain = SamplingParams(**{**p.__dict__, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0})
    assert llm.generate([prompts[2]], plain)[0].token_ids != a


def test_a_batch_without_the_new_parameters_adds_no_work(llm, prompts):
    runner = llm.engine.runner
    seqs = [Sequence("a", prompts[0], SamplingParams(temperature=0), 0),
            Sequence("b", prompts[1], SamplingParams(temperature=0.7, top_p=0.9), 1)]
    assert runner._sampling_tensors(seqs[:1], [1]) is None  # greedy: argmax only
    t = runner._sampling_tensors(seqs, [1, 1])
    assert t.processors is None and t.num_logprobs == -1
    fresh = LLM(llm.engine.config.model, device="cpu", block_size=8, num_kv_blocks=64)
    fresh.generate(prompts[:2], SamplingParams(temperature=0.8, max_tokens=4))
    assert fresh.engine.runner.penalties.counts is None  # no device state allocated


@pytest.mark.parametrize("kw", [dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(repetition_penalty=0),
                                dict(logit_bias={1: 101}), dict(logit_bias={-1: 1}), dict(min_tokens=-1),
                                dict(min_tokens=20, max_tokens=10), dict(logprobs=21)])
def test_bad_values_are_refused(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)
