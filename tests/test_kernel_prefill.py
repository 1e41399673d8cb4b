"""CUDA prefill_attention kernel vs the pure-torch reference (pdcli.kernels.reference.paged_attention).

Criterion: the kernel's max abs error against a float64 reference is at most twice PyTorch's own error
(the same reference run in bf16/fp16) plus 1e-3.
"""
import pytest
import torch

from pdcli.kernels import build, reference

pytestmark = pytest.mark.cuda

POISON = 20.0  # K/V value of every cache slot outside all contexts: unmasked, it would dominate the softmax


@pytest.fixture(scope="module")
def mod():
    return build.load()


def make_case(q_lens, prefixes, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """Random paged inputs: sequence b has prefixes[b] cached tokens then q_lens[b] new ones."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    ctx = [p + n for p, n in zip(prefixes, q_lens)]
    blocks = [-(-c // block_size) for c in ctx]
    num_blocks = sum(blocks) + 7  # spare blocks stay poisoned
    perm = torch.randperm(num_blocks, generator=gen, device="cuda").int()
    width = max(blocks) + 3  # table padded with 0 past each sequence's blocks
    tables = torch.zeros(len(ctx), width, dtype=torch.int32, device="cuda")
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), POISON, dtype=dtype, device="cuda")
    v_cache = torch.full_like(k_cache, POISON)
    start = 0
    for b, (c, nb) in enumerate(zip(ctx, blocks)):
        tables[b, :nb] = perm[start:start + nb]
        start += nb
        slots = (tables[b, :nb].long()[:, None] * block_size + torch.arange(block_size, device="cuda")).flatten()[:c]
        k_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(
            c, num_kv_heads, head_dim, generator=gen, device="cuda").to(dtype)
        v_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(
            c, num_kv_heads, head_dim, generator=gen, device="cuda").to(dtype)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen, device="cuda").to(dtype)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int64).cumsum(0).int().cuda()
    context_lens = torch.tensor(ctx, dtype=torch.int32, device="cuda")
    return q, k_cache, v_cache, tables, context_lens, qsl


def check(mod, q_lens, prefixes, num_heads, num_kv_heads, head_dim, block_size, dtype, max_query_len=None,
          seed=0, fn=None):
    q, k_cache, v_cache, tables, context_lens, qsl = make_case(q_lens, prefixes, num_heads, num_kv_heads, head_dim,
                                                               block_size, dtype, seed)
    max_query_len = max_query_len or max(q_lens)
    max_context_len = int(context_lens.max())
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))
    (fn or mod.prefill_attention)(out, q, k_cache, v_cache, tables, context_lens, qsl, max_query_len, scale)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), "some output elements were not written (or are inf/nan)"

    cpu = [t.cpu() for t in (tables, context_lens, qsl)]  # float64 reference on the CPU
    ref64 = reference.paged_attention(q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu(), *cpu,
                                      max_query_len, max_context_len, scale).cuda()
    ref16 = reference.paged_attention(q, k_cache, v_cache, tables, context_lens, qsl, max_query_len,
                                      max_context_len, scale)
    err = (out.double() - ref64).abs().max().item()
    torch_err = (ref16.double() - ref64).abs().max().item()
    rms = (out.double() - ref64).pow(2).mean().sqrt().item()
    torch_rms = (ref16.double() - ref64).pow(2).mean().sqrt().item()
    print(f"{dtype} D={head_dim} Hq={num_heads} Hk={num_kv_heads} bs={block_size}: max err {err:.2e} "
          f"(torch {torch_err:.2e}), rms {rms:.2e} (torch {torch_rms:.2e})")
    assert err <= 2 * torch_err + 1e-3
    assert rms <= 2 * torch_rms + 1e-4


# ragged, not multiples of the block size; cached prefixes; decode rows (q_len 1) mixed in; >1 query tile of 128
Q_LENS = [1, 77, 300, 1, 130, 5, 1, 64]
PREFIXES = [37, 0, 45, 0, 200, 3, 513, 64]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_matches_reference(mod, dtype, head_dim, group, block_size):
    num_kv_heads = 2
    check(mod, Q_LENS, PREFIXES, num_kv_heads * group, num_kv_heads, head_dim, block_size, dtype)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_long_sequence(mod, head_dim):
    # many key tiles, chunked prefill after a long cached prefix next to a fresh prompt
    check(mod, [1000, 777], [1500, 0], 8, 2, head_dim, 16, torch.bfloat16, seed=1)


def test_prefill_max_query_len_padded(mod):
    # a max_query_len larger than any q_len (at most the token count) only adds CTAs that exit at once
    check(mod, [3, 129, 1], [10, 0, 5], 4, 4, 128, 16, torch.bfloat16, max_query_len=133, seed=2)


def test_prefill_block_size_8_and_64(mod):
    check(mod, Q_LENS, PREFIXES, 4, 1, 128, 8, torch.float16, seed=3)
    check(mod, Q_LENS, PREFIXES, 4, 1, 64, 64, torch.bfloat16, seed=4)


def test_prefill_rejects_bad_head_dim(mod):
    q, k_cache, v_cache, tables, context_lens, qsl = make_case([4], [0], 2, 2, 64, 16, torch.bfloat16)
    q = torch.randn(4, 2, 96, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError):
        mod.prefill_attention(torch.empty_like(q), q, k_cache, v_cache, tables, context_lens, qsl, 4, 0.1)


@pytest.fixture(scope="module", params=["wgmma", "wgmma_ws", "wgmma_tma"])
def wgmma(mod, request):
    """The Hopper kernels: plain, warp-specialised (a loader warpgroup, two compute warpgroups in turn), and that
    with its K/V tiles loaded by TMA."""
    if not mod.has_prefill_attention_wgmma(128):
        pytest.skip("this build has no wgmma prefill kernel (it needs an sm_90a GPU)")
    return getattr(mod, f"prefill_attention_{request.param}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("block_size", [16, 32])
def test_wgmma_prefill_matches_reference(mod, wgmma, dtype, group, block_size):
    check(mod, Q_LENS, PREFIXES, 2 * group, 2, 128, block_size, dtype, fn=wgmma)


@pytest.mark.parametrize("block_size", [8, 64, 128, 256])
def test_tma_loader_at_every_box_height(mod, block_size):
    """TMA boxes of min(block_size, 128) cache rows: 16 boxes a tile down to one, and a box inside a larger block."""
    if not mod.has_prefill_attention_wgmma(128):
        pytest.skip("this build has no wgmma prefill kernel (it needs an sm_90a GPU)")
    check(mod, [300, 5, 129], [200, 700, 0], 8, 2, 128, block_size, torch.bfloat16, seed=3,
          fn=mod.prefill_attention_wgmma_tma)


def test_wgmma_prefill_long_and_padded(mod, wgmma):
    # many key tiles (and query tiles) after a long prefix, a fresh prompt, a tile that crosses 4k
    check(mod, [1000, 777, 4100], [1500, 0, 300], 8, 2, 128, 16, torch.bfloat16, seed=1, fn=wgmma)
    check(mod, [3, 129, 1], [10, 0, 5], 4, 4, 128, 8, torch.float16, max_query_len=133, seed=2, fn=wgmma)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wgmma_products_on_one_tile(mod, wgmma, dtype):
    """The kernel's two wgmma forms apart (wgmma_probe): S = A K^T from K-major tiles, O = half(S) V with S's
    accumulators as the register operand and V N-major; against fp32 matmuls of the same inputs."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    a, k, v = (torch.randn(n, 128, generator=gen, device="cuda").to(dtype) for n in (64, 128, 128))
    s_out, o_out = (torch.full((64, 128), float("nan"), device="cuda") for _ in range(2))
    mod.wgmma_probe(a, k, v, s_out, o_out)
    s_ref = a.float() @ k.float().T
    torch.testing.assert_close(s_out, s_ref, rtol=1e-4, atol=1e-3)  # fp32 accumulation of exact products
    o_ref = s_ref.to(dtype).float() @ v.float()
    torch.testing.assert_close(o_out, o_ref, rtol=1e-3, atol=0.5)  # the rounding of S to dtype apart


def test_wgmma_prefill_rejects_head_dim_64(mod, wgmma):
    q, k_cache, v_cache, tables, context_lens, qsl = make_case([4], [0], 2, 2, 64, 16, torch.bfloat16)
    with pytest.raises(RuntimeError, match="wgmma"):
        wgmma(torch.empty_like(q), q, k_cache, v_cache, tables, context_lens, qsl, 4, 0.1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t, hq, hk, d, block_size", [(1, 8, 2, 128, 16), (300, 32, 8, 128, 16),
                                                      (2048, 32, 8, 128, 16), (77, 12, 4, 64, 32)])
def test_fresh_prefill_sdpa_path_matches_reference(dtype, t, hq, hk, d, block_size):
    """A whole prompt of one sequence goes to SDPA over K/V gathered from the paged cache (ops.attention's
    fast path); same criterion as the kernel."""
    from pdcli.kernels import ops
    from pdcli.models.context import Context

    q, k_cache, v_cache, tables, context_lens, qsl = make_case([t], [0], hq, hk, d, block_size, dtype, seed=t)
    scale = d ** -0.5
    ctx = Context(slot_mapping=torch.empty(0), block_tables=tables, context_lens=context_lens, query_start_loc=qsl,
                  max_query_len=t, max_context_len=t, logits_indices=torch.empty(0))
    out = ops.attention(q, k_cache, v_cache, ctx, scale)
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert_as_close_as_torch(out, q, k_cache, v_cache, tables, context_lens, qsl, t, t, scale)


def assert_as_close_as_torch(out, q, k_cache, v_cache, tables, context_lens, qsl, max_q, max_ctx, scale):
    """The kernels' criterion for one output: its max error against fp64 at most twice the reference's own in the
    inputs' dtype, plus 1e-3."""
    cpu = [x.cpu() for x in (tables, context_lens, qsl)]
    ref64 = reference.paged_attention(q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu(), *cpu, max_q,
                                      max_ctx, scale)
    ref = reference.paged_attention(q, k_cache, v_cache, tables, context_lens, qsl, max_q, max_ctx, scale)
    ours_err = (out.double().cpu() - ref64).abs().max().item()
    torch_err = (ref.double().cpu() - ref64).abs().max().item()
    assert ours_err <= 2 * torch_err + 1e-3, (ours_err, torch_err)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t, prefix, hq, hk", [(300, 8192, 8, 2), (256, 512, 32, 8), (1, 64, 4, 4)])
def test_a_chunk_through_cudnn_with_its_prefix_matches_reference(dtype, t, prefix, hq, hk, grouped):
    """kernels/chunk_sdpa on the GPU (cuDNN, log-sum-exps merged): the chunk's queries against the prefix and
    themselves, the K/V heads repeated or given as they are (grouped); the kernels' criterion against fp64. The
    engine's tuning checks the same before it takes the path."""
    from pdcli.kernels import chunk_sdpa

    d, bs = 128, 16
    q, k_cache, v_cache, tables, context_lens, qsl = make_case([t], [prefix], hq, hk, d, bs, dtype, seed=t + prefix)
    scale = d ** -0.5
    before = chunk_sdpa.grouped()
    chunk_sdpa.set_grouped(grouped)
    try:
        out = chunk_sdpa.chunk_attention(q, k_cache, v_cache, tables[0], prefix, scale)
    except RuntimeError as err:
        if grouped and hq != hk:
            pytest.skip(f"cuDNN refuses a grouped call here: {err}")
        raise
    finally:
        chunk_sdpa.set_grouped(before)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    assert_as_close_as_torch(out, q, k_cache, v_cache, tables, context_lens, qsl, t, prefix + t, scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_merge_kernel_matches_the_reference_merge(mod, dtype):
    """merge_attn_states (CUDA) against reference.merge_attn_states on strided [H, T, D] views like cuDNN's
    outputs ([T, H, D] storage, a padded tail of rows) with log-sum-exps far apart and equal."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    h, t, pad, d = 8, 300, 212, 128
    a, b = (torch.randn(t + pad, h, d, generator=gen, device="cuda").to(dtype).transpose(0, 1)[:, :t]
            for _ in range(2))
    la = torch.randn(h, t + pad, generator=gen, device="cuda")[:, :t] * 8
    lb = torch.randn(h, t + pad, generator=gen, device="cuda")[:, :t] * 8
    lb[:, :10] = la[:, :10]
    out = torch.empty(t, h, d, dtype=dtype, device="cuda")
    mod.merge_attn_states(out, a, la, b, lb)
    ref = reference.merge_attn_states(a.double(), la.double(), b.double(), lb.double())
    own = reference.merge_attn_states(a, la, b, lb).double()  # fp32 math, rounded to dtype: torch's own
    err, torch_err = (out.double() - ref).abs().max().item(), (own - ref).abs().max().item()
    assert err <= 2 * torch_err + 1e-3, (err, torch_err)


def test_the_engine_times_aligned_chunks_through_cudnn_against_the_paged_kernel(mod):
    from pdcli.kernels import prefill_choice
    from pdcli.kernels.ops import prefill_kernel_fn

    from pdcli.kernels import chunk_sdpa

    before, grouped = prefill_choice.chunk_sdpa_on(), chunk_sdpa.grouped()
    try:
        row = prefill_choice.tune_chunk_sdpa(prefill_kernel_fn(mod, "mma"), 32, 8, 128, 16, torch.bfloat16, "cuda")
        assert row["matches_reference"] and row["paged_us"] > 0 and row["chunk_sdpa_us"] > 0
        assert prefill_choice.chunk_sdpa_on() == (row["choice"] == "chunk_sdpa")
        assert row["grouped"] == chunk_sdpa.grouped()
    finally:
        prefill_choice._chunk_sdpa[0] = before
        chunk_sdpa.set_grouped(grouped)
