"""P/D on one GPU: a prefill and a decode worker in two processes hand KV over through CUDA IPC."""
import pytest

from pdcli import SamplingParams
from pdcli.coordinator.central import CentralScheduler
from pdcli.workers.layout import parse_layout
from test_disagg import wait_pools_full

pytestmark = pytest.mark.cuda
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def test_same_gpu_ipc_handoff_equals_collocated(tiny_model_dir, prompts):
    path = tiny_model_dir("qwen3-gqa64")
    engine = dict(dtype="float16", max_num_batched_tokens=32, block_size=16, num_kv_blocks=256)
    with CentralScheduler(path, parse_layout("cuda:0", "cuda:0", "cuda:0"), **engine) as cs:
        coll = cs.generate(prompts, GREEDY, mode="collocated", timeout=120)
        disagg = cs.generate(prompts, GREEDY, mode="disaggregated", timeout=120)
        assert [o.error for o in disagg] == [None] * len(prompts)
        assert [o.token_ids for o in coll] == [o.token_ids for o in disagg]
        assert all(o.metrics["transfer_bytes"] > 0 for o in disagg)
        # an abort racing the handoff still returns every block
        many = [cs.submit(p, GREEDY, mode="disaggregated") for p in prompts * 4]
        for t in many[::2]:
            cs.abort(t.rid)
        for t in many:
            t.done.wait(60)
        stats = wait_pools_full(cs)
        assert all(s["num_free_blocks"] == s["num_blocks"] for s in stats), stats


def test_a_prefill_worker_hands_back_to_the_collocated_worker_on_its_gpu(tiny_model_dir, prompts):
    """One GPU's adaptive layout: the prefill worker copies each prompt's KV into the collocated worker's pool
    (CUDA IPC), which decodes it: the tokens of the collocated path, every block back in both pools."""
    from pdcli.workers.layout import pd_on_collocated

    path = tiny_model_dir("qwen3-gqa64")
    engine = dict(dtype="float16", max_num_batched_tokens=32, block_size=16, num_kv_blocks=256)
    layout = parse_layout("cuda:0", "cuda:0")
    with CentralScheduler(path, layout, pd_on_collocated=pd_on_collocated(layout, "adaptive"), **engine) as cs:
        coll = cs.generate(prompts, GREEDY, mode="collocated", timeout=120)
        disagg = cs.generate(prompts, GREEDY, mode="disaggregated", timeout=120)
        assert [o.error for o in disagg] == [None] * len(prompts)
        assert [o.token_ids for o in coll] == [o.token_ids for o in disagg]
        assert all(o.metrics["transfer_bytes"] > 0 for o in disagg)
        stats = wait_pools_full(cs)
        assert all(s["num_free_blocks"] == s["num_blocks"] for s in stats), stats


@pytest.mark.skipif(not __import__("torch").cuda.is_available() or __import__("torch").cuda.device_count() < 2,
                    reason="needs two GPUs")
def test_two_gpu_nccl_handoff_layerwise_and_whole_equal_collocated(tiny_model_dir, prompts):
    """Prefill on cuda:0, decode on cuda:1 over NCCL: layer-wise sends during the last prefill chunk and
    all-layer sends after it give the collocated path's tokens, and every block returns."""
    from test_disagg import wait_transfer_kinds

    path = tiny_model_dir("qwen3-gqa64")
    engine = dict(dtype="float16", max_num_batched_tokens=32, block_size=16, num_kv_blocks=256)
    with CentralScheduler(path, parse_layout("cuda:0", "cuda:0", "cuda:1"), **engine) as cs:
        coll = cs.generate(prompts, GREEDY, mode="collocated", timeout=120)
        for layerwise in (True, False):
            cs.kv_layerwise = layerwise
            tracked = [cs.submit(p, GREEDY, mode="disaggregated") for p in prompts * 2]
            for t in tracked:
                assert t.done.wait(120)
            assert [cs.output(t).token_ids for t in tracked] == [o.token_ids for o in coll] * 2
            kinds = wait_transfer_kinds(cs, tracked)
            assert ("layers" in kinds) if layerwise else set(kinds) == {"whole"}, kinds
        stats = wait_pools_full(cs)
        assert all(s["num_free_blocks"] == s["num_blocks"] and s["handoff"] == 0 for s in stats), stats


@pytest.mark.skipif(not __import__("torch").cuda.is_available() or __import__("torch").cuda.device_count() < 2,
                    reason="needs two GPUs")
def test_two_collocated_gpus_hand_kv_to_each_other_at_once(tiny_model_dir, prompts):
    """pd_on_collocated on cuda:0 and cuda:1: requests go P/D both ways at the same time (each direction has
    its own NCCL communicator, or two crossing sends would wait for each other); tokens equal the collocated
    path's and every block returns."""
    path = tiny_model_dir("qwen3-gqa64")
    engine = dict(dtype="float16", max_num_batched_tokens=32, block_size=16, num_kv_blocks=256)
    with CentralScheduler(path, parse_layout("cuda:0,cuda:1"), pd_on_collocated=True, **engine) as cs:
        coll = cs.generate(prompts, GREEDY, mode="collocated", timeout=120)
        for layerwise in (True, False):
            cs.kv_layerwise = layerwise
            tracked = [cs.submit(p, GREEDY, mode="disaggregated") for p in prompts * 3]
            for t in tracked:
                assert t.done.wait(120), "a handoff hung"
            assert [cs.output(t).token_ids for t in tracked] == [o.token_ids for o in coll] * 3
            assert {t.prefill_rank for t in tracked} == {0, 1}  # both directions
        stats = wait_pools_full(cs)
        assert all(s["num_free_blocks"] == s["num_blocks"] and s["handoff"] == 0 for s in stats), stats
