"""Async scheduling (step i + 1 is scheduled and launched before step i's tokens land) gives exactly the
outputs of the synchronous loop, whatever finishes, stops, forks, preempts or hits the prefix cache."""
import pytest

from conftest import assert_pool_full
from pdcli import LLM, SamplingParams

MODEL = "dummy:tiny-llama"


def run(async_scheduling: bool, prompts, params, **kw):
    llm = LLM(MODEL, device="cpu", async_scheduling=async_scheduling, **kw)
    outs = llm.generate(prompts, params)
    assert_pool_full(llm)
    return [[(c.token_ids, c.finish_reason, c.text) for c in o.outputs] for o in outs], llm


def both(prompts, params, **kw):
    a, llm_a = run(True, prompts, params, **kw)
    b, _ = run(False, prompts, params, **kw)
    assert a == b
    return a, llm_a


def test_greedy_mixed_lengths_and_token_stops(prompts):
    sync, _ = run(False, prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    # stop on a token each sequence really produces mid-way, so async rows past the stop get dropped
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[s[0][0][5]])
              for s in sync[:2]] + [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (1, 7)]
    outs, _ = both(prompts, params)
    assert [o[0][1] for o in outs] == ["stop", "stop", "length", "length"]
    assert [len(o[0][0]) for o in outs[2:]] == [1, 7]


def test_chunked_prefill_and_preemption(prompts):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    _, llm = both(prompts * 2, params, max_num_batched_tokens=16, num_kv_blocks=14, block_size=8,
                  enable_prefix_caching=False, admission_reserve=0.0)
    assert llm.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_prefix_cache_hits(prompts, async_scheduling):
    shared = prompts[2][:48]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = LLM(MODEL, device="cpu", async_scheduling=async_scheduling, block_size=8)
    first = llm.generate([shared + [5, 6, 7]], params)[0].outputs[0].token_ids
    rest = [o.outputs[0].token_ids for o in llm.generate([shared + [5, 6, 7], shared + [9]], params)]
    assert llm.engine.block_manager.num_prefix_hits >= 2 * 6
    assert rest[0] == first
    fresh = LLM(MODEL, device="cpu", async_scheduling=async_scheduling, block_size=8, enable_prefix_caching=False)
    assert fresh.generate([shared + [9]], params)[0].outputs[0].token_ids == rest[1]
    assert_pool_full(llm)


def test_seeded_sampling_forks_and_stop_strings(prompts):
    params = [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=16, seed=3, ignore_eos=True),
              SamplingParams(temperature=1.0, n=3, max_tokens=10, seed=5, ignore_eos=True),
              SamplingParams(temperature=0.7, max_tokens=20, seed=9, ignore_eos=True, stop=["e", "a"]),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)]
    outs, _ = both(prompts, params)
    assert len(outs[1]) == 3


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_abort_mid_run_returns_blocks(prompts, async_scheduling):
    llm = LLM(MODEL, device="cpu", async_scheduling=async_scheduling)
    stream = llm.stream(prompts, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    for i, _ in enumerate(stream):
        if i == 9:
            break
    stream.close()  # aborts what is left, with a step possibly in flight
    assert not llm.engine.has_unfinished_requests() or llm.engine._inflight is not None
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert_pool_full(llm)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_a_chunked_prompt_s_progress_is_reported_as_its_steps_land(async_scheduling):
    """With report_prefill_progress on (a worker's engine), every landed step that left a prompt partly prefilled
    reports (request id, prompt tokens computed), in order; the step that finishes it reports nothing."""
    from pdcli.config import EngineConfig
    from pdcli.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig.from_kwargs(MODEL, device="cpu", max_num_batched_tokens=16,
                                                async_scheduling=async_scheduling))
    engine.report_prefill_progress = True
    engine.add_request(list(range(3, 53)), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                       request_id="long")
    engine.add_request(list(range(3, 9)), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                       request_id="short")
    seen, first = [], None
    for i in range(12):
        deltas = engine.step()
        seen += engine.take_prefill_progress()
        if first is None and any(d.request_id == "long" for d in deltas):
            first = list(seen)
    assert [k for rid, k in seen if rid == "long"] == [16, 32, 48] == [k for rid, k in first if rid == "long"]
    assert all(rid == "long" for rid, _ in seen)  # the 6-token prompt fits its first step
    assert engine.take_prefill_progress() == []
    plain = LLMEngine(EngineConfig.from_kwargs(MODEL, device="cpu", max_num_batched_tokens=16))
    plain.add_request(list(range(3, 53)), SamplingParams(max_tokens=2), request_id="x")
    for _ in range(6):
        plain.step()
    assert plain.take_prefill_progress() == []  # off (offline use): nothing kept


def test_a_chunk_s_progress_waits_until_the_device_has_run_it(monkeypatch):
    """A step that only prefills part of a prompt samples nothing, so its host side returns at once while the
    device may still run it (on a GPU: StepFuture.landed, an event's query): its progress is reported once it
    has landed, in order, never before; the worker sends nothing for a step with neither tokens nor landed
    progress (the router counts the chunk as queued until then)."""
    from pdcli.config import EngineConfig
    from pdcli.engine.llm_engine import LLMEngine
    from pdcli.engine.step_future import StepFuture

    running = {"on": True}  # the device still runs every step launched so far
    monkeypatch.setattr(StepFuture, "landed", lambda self: self._host is not None or not running["on"])
    engine = LLMEngine(EngineConfig.from_kwargs(MODEL, device="cpu", max_num_batched_tokens=16,
                                                async_scheduling=False))
    engine.report_prefill_progress = True
    engine.add_request(list(range(3, 53)), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                       request_id="long")
    for _ in range(2):  # two chunks launched, neither landed
        assert engine.step() == [] and engine.take_prefill_progress() == []
    running["on"] = False
    assert engine.take_prefill_progress() == [("long", 16), ("long", 32)]
    running["on"] = True
    engine.step()  # the third chunk
    assert engine.take_prefill_progress() == []
    deltas = engine.step()  # the last chunk samples: the device has run everything before it
    assert [d.request_id for d in deltas] == ["long"]
    assert engine.take_prefill_progress() == [("long", 48)]


@pytest.mark.cuda
def test_on_a_gpu_a_chunk_s_progress_comes_once_the_device_has_run_it():
    """On the GPU a step that only prefills part of a prompt returns before the device has run it; its progress is
    reported once the device has (here: after a synchronize), never twice."""
    import torch

    from pdcli.config import EngineConfig
    from pdcli.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig.from_kwargs(MODEL, device="cuda:0", max_num_batched_tokens=16,
                                                async_scheduling=False))
    engine.report_prefill_progress = True
    engine.add_request(list(range(3, 53)), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                       request_id="long")
    assert engine.step() == []  # the first chunk: launched, nothing sampled
    torch.cuda.synchronize()
    assert engine.take_prefill_progress() == [("long", 16)] and engine.take_prefill_progress() == []
    seen = []
    while engine.has_unfinished_requests():
        engine.step()
        seen += engine.take_prefill_progress()
    assert seen == [("long", 32), ("long", 48)]
