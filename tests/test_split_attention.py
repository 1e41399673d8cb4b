"""A mixed step's attention split into decode rows and prefill rows gives the one-call result (CPU: the
reference in the kernels' signatures, which is the CPU path of a mixed step; the GPU kernels themselves are
checked in test_kernels.py)."""
import pytest
import torch

from pdcli.kernels import ops, reference
from pdcli.models.context import Context


def test_split_attention_equals_one_call():
    g = torch.Generator().manual_seed(0)
    bs, hq, hk, d = 16, 8, 2, 32
    q_lens, ctx_lens = [1, 1, 1, 37, 5, 64], [40, 9, 130, 37, 77, 100]  # three decode rows, then prefill chunks
    nb = [-(-c // bs) for c in ctx_lens]
    k = torch.randn(sum(nb) + 4, bs, hk, d, generator=g)
    v = torch.randn_like(k)
    perm = torch.randperm(sum(nb) + 4, generator=g)[:sum(nb)].int()
    tables = torch.zeros(len(nb), max(nb), dtype=torch.int32)
    i = 0
    for b, n in enumerate(nb):
        tables[b, :n] = perm[i:i + n]
        i += n
    qsl = torch.tensor([0] + q_lens).cumsum(0).int()
    lens = torch.tensor(ctx_lens, dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), hq, d, generator=g)
    ctx = Context(slot_mapping=torch.empty(0), block_tables=tables, context_lens=lens, query_start_loc=qsl,
                  max_query_len=max(q_lens), max_context_len=max(ctx_lens), logits_indices=torch.empty(0),
                  num_decode_seqs=3, prefill_query_start_loc=qsl[3:] - 3)
    split = ops.split_attention(q, ctx, ops.reference_decode, ops.reference_prefill, k, v, d ** -0.5)
    whole = reference.paged_attention(q, k, v, tables, lens, qsl, max(q_lens), max(ctx_lens), d ** -0.5)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.attention(q, k, v, ctx, d ** -0.5), whole, rtol=1e-5, atol=1e-5)  # the CPU path
    # no decode rows: one prefill call
    ctx.num_decode_seqs, ctx.prefill_query_start_loc = 0, None
    torch.testing.assert_close(ops.split_attention(q, ctx, ops.reference_decode, ops.reference_prefill, k, v, d ** -0.5), whole,
                               rtol=1e-5, atol=1e-5)


def test_chunked_fp32_reference_equals_the_reference():
    """The long-context check's reference (per sequence and chunk of queries) is the same attention: varlen,
    cached prefixes, GQA, chunks smaller than a prompt, poisoned slots outside every context."""
    from pdcli.kernels import reference

    gen = torch.Generator().manual_seed(0)
    q_lens, prefixes, hq, hk, d, bs = [37, 5, 61], [0, 19, 8], 4, 2, 16, 8
    ctx = [p + n for p, n in zip(prefixes, q_lens)]
    blocks = [-(-c // bs) for c in ctx]
    num_blocks = sum(blocks) + 3
    perm = torch.randperm(num_blocks, generator=gen).int()
    tables = torch.zeros(len(ctx), max(blocks) + 2, dtype=torch.int32)
    kc = torch.full((num_blocks, bs, hk, d), 20.0)
    vc = torch.full_like(kc, 20.0)
    start = 0
    for b, (c, nb) in enumerate(zip(ctx, blocks)):
        tables[b, :nb] = perm[start:start + nb]
        start += nb
        slots = (tables[b, :nb].long()[:, None] * bs + torch.arange(bs)).flatten()[:c]
        kc.view(-1, hk, d)[slots] = torch.randn(c, hk, d, generator=gen)
        vc.view(-1, hk, d)[slots] = torch.randn(c, hk, d, generator=gen)
    q = torch.randn(sum(q_lens), hq, d, generator=gen)
    qsl = torch.tensor([0] + q_lens).cumsum(0).int()
    lens = torch.tensor(ctx, dtype=torch.int32)
    want = reference.paged_attention(q.double(), kc.double(), vc.double(), tables, lens, qsl, max(q_lens), max(ctx),
                                     d ** -0.5)
    got = reference.paged_attention_fp32_chunked(q, kc, vc, tables, lens, qsl, d ** -0.5, chunk=16)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, atol=1e-5)


def test_balanced_decode_makes_one_plan_per_step(monkeypatch):
    """PDCLI_DECODE_SPLIT=balanced: the first decode call of a step makes the plan from its context lengths, the
    other layers reuse it (one plan kernel per step, inside a CUDA graph when captured); an explicit split count
    takes the uniform kernel; with PDCLI_DECODE_SPLIT=uniform the uniform kernel is the decode function itself
    (balanced is the default)."""
    calls = []

    class FakeKernels:
        def decode_attention(self, *a):
            calls.append(("uniform", a[7]))

        def decode_attention_resident_ctas(self, d):
            return 264

        def decode_plan(self, lens, target, min_chunk):
            calls.append(("plan", target, min_chunk))
            return torch.zeros(1)

        def decode_attention_planned(self, out, q, k, v, tables, lens, scale, plan, counters, early_kv, persistent):
            calls.append(("planned", plan is ctx.decode_plan, counters is ctx.decode_counters, early_kv))

    mod = FakeKernels()
    q, k = torch.zeros(5, 8, 64), torch.zeros(4, 16, 2, 64)
    lens = torch.tensor([9000, 12, 40, 7, 1], dtype=torch.int32)
    ctx = Context(slot_mapping=torch.empty(0), block_tables=torch.zeros(5, 1), context_lens=lens,
                  query_start_loc=torch.arange(6), max_query_len=1, max_context_len=9000, logits_indices=torch.empty(0))
    from pdcli import envs

    monkeypatch.setattr(ops, "_decode_split", envs.decode_split)  # read afresh (ops caches it per process)
    monkeypatch.setenv("PDCLI_DECODE_SPLIT", "uniform")
    assert ops.decode_fn(mod, ctx) == mod.decode_attention
    monkeypatch.delenv("PDCLI_DECODE_SPLIT", raising=False)
    for _layer in range(3):
        ops.decode_fn(mod, ctx)(None, q, k, k, ctx.block_tables, lens, 0.1, 0, 9000)
    ops.decode_fn(mod, ctx)(None, q, k, k, ctx.block_tables, lens, 0.1, 4, 9000)
    # one plan (and merge counters) per step; the later layers' K/V tiles may load before the kernel ahead ends
    assert calls == [("plan", 132, 256), ("planned", True, True, False), ("planned", True, True, True),
                     ("planned", True, True, True), ("uniform", 4)]


def test_a_whole_prompt_is_attended_at_its_bucket_length_exactly():
    """ops.fresh_prefill_attention pads a prompt's rows to a multiple of FRESH_PREFILL_BUCKET (few shapes for
    cuDNN, which builds a graph per shape): its rows come out as unpadded causal attention's, on CPU here."""
    import torch.nn.functional as F

    assert [ops.fresh_prefill_len(t) for t in (1, 255, 256, 257, 2047)] == [256, 256, 256, 512, 2048]
    gen = torch.Generator().manual_seed(0)
    t, hq, hk, d, bs = 300, 8, 2, 64, 16
    blocks = -(-t // bs)
    k_cache, v_cache = (torch.randn(blocks + 3, bs, hk, d, generator=gen) for _ in range(2))
    table = torch.randperm(blocks + 3, generator=gen)[:blocks]
    q = torch.randn(t, hq, d, generator=gen)
    out = ops.fresh_prefill_attention(q, k_cache, v_cache, table, d ** -0.5)
    k, v = (c[table].flatten(0, 1)[:t].transpose(0, 1)[None] for c in (k_cache, v_cache))
    ref = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, is_causal=True, scale=d ** -0.5,
                                         enable_gqa=True)[0].transpose(0, 1)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix, t", [(64, 40), (512, 256), (8192, 300)])
def test_a_chunk_through_sdpa_with_its_prefix_is_paged_attention(prefix, t):
    """kernels/chunk_sdpa: the chunk's queries against the prefix and against themselves (causal), merged by their
    log-sum-exps, on CPU here (the CPU's flash kernel; cuDNN on a GPU, tests/test_kernel_prefill.py)."""
    from pdcli.kernels import chunk_sdpa

    gen = torch.Generator().manual_seed(prefix + t)
    hq, hk, d, bs = 8, 2, 32, 16
    nb = -(-(prefix + t) // bs)
    k_cache, v_cache = (torch.randn(nb + 3, bs, hk, d, generator=gen) for _ in range(2))
    table = torch.randperm(nb + 3, generator=gen)[:nb]
    q = torch.randn(t, hq, d, generator=gen)
    out = chunk_sdpa.chunk_attention(q, k_cache, v_cache, table, prefix, d ** -0.5)
    lens, qsl = torch.tensor([prefix + t], dtype=torch.int32), torch.tensor([0, t], dtype=torch.int32)
    ref = reference.paged_attention(q, k_cache, v_cache, table[None].int(), lens, qsl, t, prefix + t, d ** -0.5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_the_chunks_that_go_through_sdpa():
    from pdcli.kernels.chunk_sdpa import applies

    assert applies(1, False, 8192, 16384) and applies(1, False, 300, 8492)
    assert not applies(1, False, 8192, 8192)  # a whole prompt: the fresh path
    assert not applies(1, False, 300, 5300)  # a prefix of another length: a new cuDNN shape
    assert not applies(2, False, 8192, 16384) and not applies(1, True, 8192, 16384)


def test_chunk_tuning_falls_back_to_repeated_heads_where_a_grouped_call_fails(monkeypatch):
    """prefill_choice.tune_chunk_sdpa tries the K/V heads as they are first; a call that raises (or a wrong
    output) leaves them repeated, and the path is on only where it matched and timed faster."""
    from pdcli.kernels import chunk_sdpa, prefill_choice

    real, tried = chunk_sdpa.sdpa_lse, []

    def refusing(q, k, v, causal, scale):
        tried.append(chunk_sdpa.grouped())
        if chunk_sdpa.grouped():
            raise RuntimeError("no grouped heads here")
        return real(q, k, v, causal, scale)

    monkeypatch.setattr(chunk_sdpa, "sdpa_lse", refusing)
    monkeypatch.setattr(chunk_sdpa, "_grouped", [False])
    monkeypatch.setattr(prefill_choice, "_chunk_sdpa", [False])
    monkeypatch.setattr(prefill_choice, "CHUNK_SDPA_SHAPE", (64, 128))
    times = iter([100.0, 50.0])  # the paged kernel, then the chunk path
    row = prefill_choice.tune_chunk_sdpa(lambda *a: None, 8, 2, 32, 16, torch.float32, "cpu",
                                         time_us=lambda fn: next(times))
    assert tried[0] is True and False in tried  # the grouped call first, then the repeated heads
    assert row["matches_reference"] and not row["grouped"] and not chunk_sdpa.grouped()
    assert row["choice"] == "chunk_sdpa" and prefill_choice.chunk_sdpa_on()
    assert prefill_choice.chunk_sdpa_row() == row
