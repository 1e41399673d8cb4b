"""CUDA kernels against the pure-torch reference on fresh random inputs (run on the GPU machine)."""
import pytest
import torch

from pdcli.kernels import build, reference

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def mod():
    return build.load()


def paged_cache(num_blocks, block_size, hk, d, dtype, gen):
    k = torch.randn(num_blocks, block_size, hk, d, generator=gen, device="cuda").to(dtype)
    v = torch.randn(num_blocks, block_size, hk, d, generator=gen, device="cuda").to(dtype)
    return k, v


def block_tables_for(ctx_lens, block_size, num_blocks, gen):
    need = [-(-c // block_size) for c in ctx_lens]
    perm = torch.randperm(num_blocks, generator=gen, device="cuda")[:sum(need)].int()
    tables = torch.zeros(len(ctx_lens), max(need), dtype=torch.int32, device="cuda")
    i = 0
    for b, n in enumerate(need):
        tables[b, :n] = perm[i:i + n]
        i += n
    return tables


def rel_err(x, ref):
    return ((x.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_store_kvcache_exact(mod, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    t, hq, hk, d = 37, 8, 2, 128
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=gen, device="cuda").to(dtype)
    _, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)  # strided views, as in the model
    k, v = k.view(t, hk, d), v.view(t, hk, d)
    kc, vc = torch.randn(2, 64, 16, hk, d, generator=gen, device="cuda").to(dtype)
    slots = torch.randperm(64 * 16, generator=gen, device="cuda")[:t]
    slots[5] = -1  # padding token: skipped
    ref_k, ref_v = kc.clone(), vc.clone()
    keep = slots >= 0
    reference.store_kvcache(k[keep], v[keep], ref_k, ref_v, slots[keep])
    mod.store_kvcache(k, v, kc, vc, slots)
    torch.cuda.synchronize()
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)


DECODE_CASES = [  # (context lengths, block size)
    ([1, 7, 16, 17, 100, 333], 16),
    ([4096] * 4 + [1000], 16),
    ([513, 2049], 32),
    ([33000], 16),  # one long sequence: many splits
    ([50, 9, 130], 8),
    ([16384] + [300] * 40 + [0], 16),  # one long context beside many short ones (and a padded row)
    ([1, 63, 64, 65, 700, 4100], 64),  # the engine's default block size
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d, hq, hk", [(128, 32, 8), (128, 8, 8), (64, 16, 2), (128, 16, 2),
                                       (128, 12, 4), (64, 12, 2), (64, 6, 3), (64, 32, 16)])
@pytest.mark.parametrize("ctx_lens, block_size", DECODE_CASES)
def test_decode_attention_matches_reference(mod, dtype, d, hq, hk, ctx_lens, block_size):
    gen = torch.Generator(device="cuda").manual_seed(hash((d, hq, hk, block_size, len(ctx_lens))) % 2**31)
    b = len(ctx_lens)
    num_blocks = sum(-(-c // block_size) for c in ctx_lens) + 8
    kc, vc = paged_cache(num_blocks, block_size, hk, d, dtype, gen)
    tables = block_tables_for(ctx_lens, block_size, num_blocks, gen)
    lens = torch.tensor(ctx_lens, dtype=torch.int32, device="cuda")
    q = torch.randn(b, hq, d, generator=gen, device="cuda").to(dtype)
    qsl = torch.arange(b + 1, dtype=torch.int32, device="cuda")
    scale = d ** -0.5
    args = (tables, lens, qsl, 1, max(ctx_lens), scale)
    ref32 = reference.paged_attention(q.float(), kc.float(), vc.float(), *args)
    ref16 = reference.paged_attention(q, kc, vc, *args)
    rows = lens > 0  # a padded row (length 0) has no reference; its output must still be written
    for splits in (0, 1, 3, 7, "balanced 1 0", "balanced 8 0", "balanced 300 0", "balanced 300 256",
                   "fused 8 0", "fused 300 0", "persistent 1 0", "persistent 8 0", "persistent 300 256",
                   "persistent-fused 8 0", "persistent-fused 300 0"):
        out = torch.full_like(q, float("nan"))
        if isinstance(splits, str):  # parts of equal key counts (decode_plan), about target_slots of them
            target, min_chunk = map(int, splits.split()[1:])
            plan = mod.decode_plan(lens, target, min_chunk)
            check_decode_plan(plan.cpu().tolist(), ctx_lens, target, min_chunk)
            persistent = splits.startswith("persistent")  # one wave of CTAs taking parts in turn
            if splits.split()[0].endswith("fused"):  # merged by each sequence's last part, as in later layers
                counters = torch.zeros(b * hk, dtype=torch.int32, device="cuda")
                for _layer in range(2):  # the counts are left at zero for the next layer
                    out.fill_(float("nan"))
                    mod.decode_attention_planned(out, q, kc, vc, tables, lens, scale, plan, counters, True, persistent)
                assert (counters == 0).all()
            else:
                mod.decode_attention_planned(out, q, kc, vc, tables, lens, scale, plan, persistent=persistent)
        else:
            mod.decode_attention(out, q, kc, vc, tables, lens, scale, splits, max(ctx_lens))
        torch.cuda.synchronize()
        assert not out.isnan().any(), "unwritten or NaN output"
        err, bound = rel_err(out[rows], ref32[rows]), 2 * rel_err(ref16[rows], ref32[rows]) + 1e-3
        assert err <= bound, (splits, err, bound)


def check_decode_plan(plan: list[int], ctx_lens: list[int], target: int, min_chunk: int = 0) -> None:
    """The plan's layout (decode_attention.cu): chunk, parts in all, slot_seq[S], slot_part[S], seq_offset[B],
    seq_parts[B]; every sequence's parts are consecutive slots covering its keys in chunks, at most target + B."""
    b = len(ctx_lens)
    s = (len(plan) - 2 - 2 * b) // 2
    chunk, used = plan[0], plan[1]
    slot_seq, slot_part = plan[2:2 + s], plan[2 + s:2 + 2 * s]
    offset, parts = plan[2 + 2 * s:2 + 2 * s + b], plan[2 + 2 * s + b:]
    least = max(min_chunk, -(-sum(ctx_lens) // target))
    assert s == target + b and chunk % 64 == 0 and least <= chunk < least + 64
    assert parts == [max(1, -(-c // chunk)) for c in ctx_lens] and used == sum(parts) <= s
    assert offset == [sum(parts[:i]) for i in range(b)]
    assert [(slot_seq[j], slot_part[j]) for j in range(used)] == [(i, p) for i in range(b) for p in range(parts[i])]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_engine_decode_logits_kernel_vs_reference(dtype, tiny_model_dir, prompts, monkeypatch):
    """The engine's decode steps on the kernel path give the reference path's logits (tiny model with head_dim 64,
    teacher-forced so both paths see the same tokens)."""
    from pdcli import LLM
    from pdcli.kernels import ops
    from tiny_models import pdcli_decode_logits

    path = tiny_model_dir("qwen3-gqa64")
    forced = prompts[3][:16]
    kernel = LLM(path, device="cuda", dtype=dtype, block_size=16, num_kv_blocks=64)
    assert ops.kernel_path(torch.device("cuda"), getattr(torch, dtype), 64, 2) == "cuda"
    ours = pdcli_decode_logits(kernel, prompts[2], forced)
    monkeypatch.setenv("PDCLI_DISABLE_KERNEL", "1")
    monkeypatch.delenv("PDCLI_REQUIRE_KERNEL", raising=False)  # the reference path, on purpose
    ops._kernels_for.cache_clear()
    build.load.cache_clear()
    try:
        ref = LLM(path, device="cuda", dtype=dtype, block_size=16, num_kv_blocks=64)
        assert ops.kernel_path(torch.device("cuda"), getattr(torch, dtype), 64, 2) == "reference"
        theirs = pdcli_decode_logits(ref, prompts[2], forced)
    finally:
        ops._kernels_for.cache_clear()
        build.load.cache_clear()
    err = ((ours - theirs).norm() / theirs.norm()).item()
    print(f"{dtype}: decode logits rel err kernel vs reference {err:.2e}")
    assert err < (2e-2 if dtype == "bfloat16" else 3e-3)


@pytest.mark.parametrize("split", ["uniform", "balanced"])
def test_cuda_graph_decode_equals_eager(tiny_model_dir, prompts, monkeypatch, split):
    """Replayed graphs decode as eager steps do, with either split-KV (a balanced plan is made inside the graph
    from each replay's context lengths)."""
    from pdcli import LLM, SamplingParams, envs
    from pdcli.kernels import ops

    monkeypatch.setenv("PDCLI_DECODE_SPLIT", split)
    monkeypatch.setattr(ops, "_decode_split", envs.decode_split)  # read afresh (ops caches it per process)
    path = tiny_model_dir("qwen3-gqa64")
    p = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    graphed = LLM(path, device="cuda", dtype="float16", num_kv_blocks=128, max_num_seqs=8)
    assert graphed.engine.runner.graphs is not None
    eager = LLM(path, device="cuda", dtype="float16", num_kv_blocks=128, max_num_seqs=8, enforce_eager=True)
    assert eager.engine.runner.graphs is None
    a = [o.token_ids for o in graphed.generate(prompts, p)]
    b = [o.token_ids for o in eager.generate(prompts, p)]
    assert a == b
    assert graphed.engine.num_free_blocks() == graphed.engine.runner.num_blocks


def test_bad_inputs_raise_not_crash(mod):
    q = torch.randn(2, 8, 96, device="cuda", dtype=torch.bfloat16)
    kc = torch.zeros(4, 16, 2, 96, device="cuda", dtype=torch.bfloat16)
    tables = torch.zeros(2, 1, dtype=torch.int32, device="cuda")
    lens = torch.ones(2, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="head_dim must be 64 or 128, got 96"):
        mod.decode_attention(torch.empty_like(q), q, kc, kc, tables, lens, 0.1, 0, 1)
    k = torch.randn(2, 2, 96, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="dtype mismatch"):
        mod.store_kvcache(k, k, kc, kc, torch.zeros(2, dtype=torch.long, device="cuda"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_step_split_matches_reference(mod, dtype):
    """Decode rows of a mixed step go to the decode kernel, the prefill rows to the prefill kernel (ops.attention)."""
    from pdcli.kernels import ops
    from pdcli.models.context import Context

    gen = torch.Generator(device="cuda").manual_seed(7)
    q_lens, ctx_lens, bs, hq, hk, d = [1, 1, 1, 300, 5], [4000, 9, 130, 300, 77], 16, 32, 8, 128
    num_blocks = sum(-(-c // bs) for c in ctx_lens) + 8
    kc, vc = paged_cache(num_blocks, bs, hk, d, dtype, gen)
    tables = block_tables_for(ctx_lens, bs, num_blocks, gen)
    lens = torch.tensor(ctx_lens, dtype=torch.int32, device="cuda")
    qsl = torch.tensor([0] + q_lens, device="cuda").cumsum(0).int()
    q = torch.randn(int(qsl[-1]), hq, d, generator=gen, device="cuda").to(dtype)
    ctx = Context(slot_mapping=torch.empty(0), block_tables=tables, context_lens=lens, query_start_loc=qsl,
                  max_query_len=max(q_lens), max_context_len=max(ctx_lens), logits_indices=torch.empty(0),
                  num_decode_seqs=3, prefill_query_start_loc=(qsl[3:] - 3).int())
    out = ops.attention(q, kc, vc, ctx, d ** -0.5)
    args = (tables, lens, qsl, max(q_lens), max(ctx_lens), d ** -0.5)
    ref32 = reference.paged_attention(q.float(), kc.float(), vc.float(), *args)
    ref16 = reference.paged_attention(q, kc, vc, *args)
    assert rel_err(out, ref32) <= 2 * rel_err(ref16, ref32) + 1e-3
