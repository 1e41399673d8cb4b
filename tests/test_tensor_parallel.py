"""Tensor parallelism on the CPU (gloo, spawned follower ranks, loopback): tensor_parallel_size=2 gives the tokens
of tensor_parallel_size=1 and of transformers, and the same log-probabilities within fp32 tolerance, on GQA,
MHA with tied embeddings and replicated-KV checkpoints, with chunked prefill, preemption, n > 1 and abort.
Only rank 0 samples: the followers run on the tokens it sends (a seeded sampled run equals tp=1's)."""
import time

import numpy as np
import pytest

from conftest import assert_pool_full
from pdcli import LLM, SamplingParams
from tiny_models import hf_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
# (name, what it checks): llama-mha-tied: MHA, tied embedding and LM head; qwen2-yarn: 1 KV head replicated
# on both ranks, q/k/v biases; qwen3-gqa: q/k norms
NAMES = ["llama-gqa", "llama-mha-tied", "qwen2-yarn", "qwen3-gqa"]


@pytest.fixture(scope="module")
def engines():
    made = []

    def make(path, **kw):
        llm = LLM(path, device="cpu", block_size=8, **kw)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.engine.close()


@pytest.mark.parametrize("name", NAMES)
def test_tp2_greedy_equals_tp1_and_transformers_with_chunked_prefill(name, engines, tiny_model_dir, prompts):
    path = tiny_model_dir(name)
    kw = dict(max_num_batched_tokens=16, num_kv_blocks=64)  # prompts of 37 and 61 tokens take 3 and 4 chunks
    tp2 = engines(path, tensor_parallel_size=2, **kw)
    got = [o.outputs[0].token_ids for o in tp2.generate(prompts, GREEDY)]
    assert got == hf_greedy(path, prompts, 16)
    assert got == [o.outputs[0].token_ids for o in engines(path, **kw).generate(prompts, GREEDY)]
    assert_pool_full(tp2)


def test_tp2_logprobs_equal_tp1_within_fp32_tolerance(engines, tiny_model_dir, prompts):
    path = tiny_model_dir("llama-gqa")
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5)
    a = engines(path, num_kv_blocks=64).generate(prompts, sp)
    b = engines(path, num_kv_blocks=64, tensor_parallel_size=2).generate(prompts, sp)
    for x, y in zip(a, b):
        for u, v in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            assert np.allclose(u.logprob, v.logprob, atol=1e-5)
            assert u.top_ids == v.top_ids and np.allclose(u.top_logprobs, v.top_logprobs, atol=1e-5)


def test_tp2_preemption_forks_sampling_and_abort(engines, tiny_model_dir, prompts):
    """A pool too small for the batch (preemption), n = 2 (forked blocks copied on write), seeded sampling
    (rank 0's tokens feed the followers), and a request aborted midway: tp=2 as tp=1, the pool full after."""
    path = tiny_model_dir("qwen3-gqa")
    kw = dict(max_num_batched_tokens=32, num_kv_blocks=18, admission_reserve=0.0)
    params = [GREEDY, SamplingParams(n=2, temperature=0, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True), GREEDY]

    def run(llm):
        e = llm.engine
        ids = [e.add_request(p, sp) for p, sp in zip(prompts, params)]
        steps = 0
        while e.has_unfinished_requests():
            e.step()
            steps += 1
            if steps == 6:
                e.abort_request(ids[3])
        outs = [e.pop_finished(r) for r in ids[:3]]
        return [[c.token_ids for c in o.outputs] for o in outs], e.scheduler.num_preemptions

    want, _ = run(engines(path, **kw))
    tp2 = engines(path, tensor_parallel_size=2, **kw)
    got, preemptions = run(tp2)
    assert got == want and preemptions > 0
    assert got[1][0] == got[1][1]
    assert_pool_full(tp2)


def test_a_dead_follower_fails_the_step_at_once(tiny_model_dir, prompts):
    llm = LLM(tiny_model_dir("llama-gqa"), device="cpu", num_kv_blocks=64, tensor_parallel_size=2)
    try:
        proc, _ = llm.engine.followers[0]
        proc.kill()
        proc.join(10)
        began = time.monotonic()
        with pytest.raises(Exception):
            llm.generate(prompts, GREEDY)
        assert time.monotonic() - began < 10
    finally:
        llm.engine.close()


@pytest.mark.parametrize("size, says", [(3, "does not divide the model's 4 attention heads"),
                                        (0, "at least 1")])
def test_a_split_the_model_cannot_take_is_refused(size, says, tiny_model_dir):
    with pytest.raises(ValueError, match=says):
        LLM(tiny_model_dir("llama-gqa"), device="cpu", num_kv_blocks=16, tensor_parallel_size=size)


def test_disaggregated_tp2_on_both_sides_equals_collocated(tiny_model_dir, prompts):
    """Each prefill rank's KV shard goes to the decode worker's rank of the same index, layer-wise and whole."""
    from pdcli.coordinator.central import CentralScheduler
    from pdcli.workers.layout import parse_layout
    from test_disagg import wait_pools_full

    path = tiny_model_dir("qwen3-gqa")
    want = [o.outputs[0].token_ids for o in LLM(path, device="cpu", num_kv_blocks=64, block_size=8).generate(
        prompts, GREEDY)]
    with CentralScheduler(path, parse_layout("", "cpu", "cpu", tp=2), mode="disaggregated", num_kv_blocks=64,
                          block_size=8, async_scheduling=True) as cs:  # as on GPUs (the decode worker's steps)
        assert [w.spec.tp_size for w in cs.workers] == [2, 2]
        for layerwise in (True, False):
            cs.kv_layerwise = layerwise
            outs = cs.generate(prompts, GREEDY, timeout=120)
            assert [o.token_ids for o in outs] == want
            assert {o.metrics["path"] for o in outs} == {"disaggregated"}
        stats = wait_pools_full(cs)
        assert all(s["num_free_blocks"] == s["num_blocks"] for s in stats), stats


def _children(pid: int) -> list[int]:
    from test_serve import children

    return children(pid)


def test_a_killed_follower_ends_the_workers_requests_with_errors(tiny_model_dir, prompts):
    import os
    import signal

    from pdcli.coordinator.central import CentralScheduler
    from pdcli.workers.layout import parse_layout

    long = SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True)
    with CentralScheduler(tiny_model_dir("llama-gqa"), parse_layout("cpu", tp=2), num_kv_blocks=2048,
                          block_size=8, max_model_len=4096) as cs:
        tracked = [cs.submit(p, long) for p in prompts]
        deadline = time.monotonic() + 60
        while not all(t.first_token_time for t in tracked) and time.monotonic() < deadline:
            time.sleep(0.02)
        followers = [c for c in _children(cs.workers[0].proc.pid)
                     if "spawn_main" in open(f"/proc/{c}/cmdline").read().replace("\0", " ")]
        assert len(followers) == 1
        os.kill(followers[0], signal.SIGKILL)
        killed = time.monotonic()
        for t in tracked:
            assert t.done.wait(10), "a request of the broken worker hung"
        assert time.monotonic() - killed < 10
        assert all(cs.output(t).error for t in tracked)


def test_layouts_with_tensor_parallelism():
    from pdcli.workers.layout import parse_layout

    p, d = parse_layout("", "cuda:0+cuda:1", "cuda:2,cuda:3", tp=2)
    assert (p.device, p.tp_devices, d.device, d.tp_devices) == ("cuda:0", ("cuda:0", "cuda:1"), "cuda:2",
                                                                ("cuda:2", "cuda:3"))
    assert [s.tp_devices for s in parse_layout("cpu", tp=2)] == [("cpu", "cpu")]
    assert [s.tp_devices for s in parse_layout("cuda:0,cuda:1,cuda:2,cuda:3", tp=2)] == [
        ("cuda:0", "cuda:1"), ("cuda:2", "cuda:3")]
    with pytest.raises(ValueError, match="group of 2 devices but --tensor-parallel-size is 1"):
        parse_layout("cuda:0+cuda:1")
    with pytest.raises(ValueError, match="not a multiple of --tensor-parallel-size 2"):
        parse_layout("cuda:0,cuda:1,cuda:2", tp=2)
    from pdcli.bench.runner import layout_for

    p, d = layout_for("disaggregated", [f"cuda:{i}" for i in range(4)], tp=2)  # bench: the list in tp groups
    assert (p.role, p.tp_devices, d.role, d.tp_devices) == ("prefill", ("cuda:0", "cuda:1"), "decode",
                                                            ("cuda:2", "cuda:3"))
    assert [s.tp_devices for s in layout_for("collocated", ["cpu", "cpu"], tp=2)] == [("cpu", "cpu")] * 2


def test_tp2_with_async_scheduling_equals_tp1(engines, tiny_model_dir, prompts):
    """Async scheduling (as on GPUs): step i + 1 is sent before step i's tokens land; the followers patch them in
    from rank 0's broadcast, as rank 0 does from its own device output."""
    path = tiny_model_dir("llama-gqa")
    params = [GREEDY, SamplingParams(n=2, temperature=0, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=3, max_tokens=16, ignore_eos=True), GREEDY]
    kw = dict(max_num_batched_tokens=32, num_kv_blocks=64)
    want = [[c.token_ids for c in o.outputs] for o in engines(path, **kw).generate(prompts, params)]
    tp2 = engines(path, tensor_parallel_size=2, async_scheduling=True, **kw)
    assert tp2.engine.async_scheduling
    got = [[c.token_ids for c in o.outputs] for o in tp2.generate(prompts, params)]
    assert got == want
    assert_pool_full(tp2)
