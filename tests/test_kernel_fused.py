"""The fused elementwise kernels (RMSNorm, add + RMSNorm, SiLU-and-mul, qkv norm + rotary + KV store)
against the pure-torch reference on fresh random inputs (run on the GPU machine)."""
import pytest
import torch

from pdcli.kernels import build, reference
from pdcli.models.rotary import RotaryEmbedding

pytestmark = pytest.mark.cuda
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def mod():
    return build.load()


def rel_err(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def check(out, ref_half, ref32, what):
    """Kernel error against fp32 at most twice torch's own half-precision error (plus a hair)."""
    assert not out.isnan().any(), what
    e, e_torch = rel_err(out, ref32), rel_err(ref_half, ref32)
    assert e <= 2 * e_torch + 1e-6, (what, e, e_torch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, dim", [(1, 4096), (37, 4096), (300, 896), (5, 8192), (4, 24), (3, 16392),
                                       (2, 32768)])  # up to 4 vectors a thread
def test_rms_norm(mod, dtype, rows, dim):
    gen = torch.Generator(device="cuda").manual_seed(rows * dim)
    x = torch.randn(rows, dim, generator=gen, device="cuda").to(dtype)
    w = (1 + 0.1 * torch.randn(dim, generator=gen, device="cuda")).to(dtype)
    out = torch.empty_like(x)
    mod.rms_norm(out, x, w, 1e-6)
    check(out, reference.rms_norm(x, w, 1e-6), reference.rms_norm(x.float(), w.float(), 1e-6), "rms_norm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, dim", [(1, 4096), (64, 4096), (513, 1024), (3, 16392)])
def test_fused_add_rms_norm(mod, dtype, rows, dim):
    gen = torch.Generator(device="cuda").manual_seed(rows + dim)
    x = torch.randn(rows, dim, generator=gen, device="cuda").to(dtype)
    res = (4 * torch.randn(rows, dim, generator=gen, device="cuda")).to(dtype)
    w = (1 + 0.1 * torch.randn(dim, generator=gen, device="cuda")).to(dtype)
    ref_out, ref_res = reference.fused_add_rms_norm(x, res, w, 1e-5)
    ref32_out, ref32_res = reference.fused_add_rms_norm(x.float(), res.float(), w.float(), 1e-5)
    mod.fused_add_rms_norm(x, res, w, 1e-5)  # in place
    assert torch.equal(res, ref_res), "the residual sum is one rounded add"
    check(x, ref_out, ref32_out, "fused_add_rms_norm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, d", [(1, 14336), (64, 14336), (300, 3072), (3, 8)])
def test_silu_and_mul(mod, dtype, rows, d):
    gen = torch.Generator(device="cuda").manual_seed(rows + d)
    x = (3 * torch.randn(rows, 2 * d, generator=gen, device="cuda")).to(dtype)
    out = torch.empty(rows, d, dtype=dtype, device="cuda")
    mod.silu_and_mul(out, x)
    check(out, reference.silu_and_mul(x), reference.silu_and_mul(x.float()), "silu_and_mul")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d, hq, hk, qk_norm", [(128, 32, 8, False), (128, 32, 8, True), (64, 14, 2, True),
                                                (64, 8, 8, False)])
@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}])
def test_qkv_rope_store(mod, dtype, d, hq, hk, qk_norm, scaling):
    gen = torch.Generator(device="cuda").manual_seed(d + hq + hk + qk_norm)
    t, num_blocks, block_size = 45, 16, 16
    rope = RotaryEmbedding(d, 500000.0, scaling, 40000).cuda()
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=gen, device="cuda").to(dtype)
    positions = torch.randint(0, 40000, (t,), generator=gen, device="cuda")
    slots = torch.randperm(num_blocks * block_size, generator=gen, device="cuda")[:t]
    slots[3] = -1  # a padded row: nothing stored
    norms = [(1 + 0.1 * torch.randn(d, generator=gen, device="cuda")).to(dtype) for _ in range(2)] if qk_norm \
        else [None, None]
    caches = torch.randn(2, num_blocks, block_size, hk, d, generator=gen, device="cuda").to(dtype)

    def run(fn, dt):
        kc, vc = caches.to(dt).clone()
        q = fn(qkv.to(dt), positions, rope.cos, rope.sin, *[n if n is None else n.to(dt) for n in norms], 1e-6,
               kc, vc, slots, hq)
        return q, kc, vc

    def kernel(qkv_, pos, cos, sin, qn, kn, eps, kc, vc, sl, nh):
        q = torch.empty(qkv_.shape[0], nh, d, dtype=qkv_.dtype, device="cuda")
        mod.qkv_rope_store(q, qkv_, pos, cos, sin, qn, kn, eps, kc, vc, sl)
        return q

    got = run(kernel, dtype)
    ref = run(reference.qkv_rope_store, dtype)
    ref32 = run(reference.qkv_rope_store, torch.float32)
    for name, a, b, c in zip("qkv", got, ref, ref32):
        check(a, b, c, name)
    keep = slots >= 0
    kc0, vc0 = caches
    for a, c0 in zip(got[1:], (kc0, vc0)):  # untouched slots keep their old rows
        untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device="cuda")
        untouched[slots[keep]] = False
        assert torch.equal(a.flatten(0, 1)[untouched], c0.flatten(0, 1)[untouched])


def test_fused_bad_inputs_raise(mod):
    x = torch.randn(4, 100, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiple of 8 values, got 100"):
        mod.rms_norm(torch.empty_like(x), x, torch.ones(100, device="cuda", dtype=torch.bfloat16), 1e-6)
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="must not alias"):
        mod.fused_add_rms_norm(x, x, torch.ones(64, device="cuda", dtype=torch.bfloat16), 1e-6)
    with pytest.raises(RuntimeError, match="out must be"):
        mod.silu_and_mul(torch.empty(4, 64, device="cuda", dtype=torch.bfloat16), x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n, k, bias", [(6144, 4096, False), (4095, 14336, True), (33, 64, True), (1, 8, False)])
def test_gemv(mod, dtype, m, n, k, bias):
    gen = torch.Generator(device="cuda").manual_seed(m * n + k)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    w = (torch.randn(n, k, generator=gen, device="cuda") * k ** -0.5).to(dtype)
    b = torch.randn(n, generator=gen, device="cuda").to(dtype) if bias else None
    y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
    mod.gemv(y, x, w, b)
    ref32 = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    check(y, torch.nn.functional.linear(x, w, b), ref32, "gemv")


def test_gemv_bad_inputs_raise(mod):
    x = torch.randn(5, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="1 to 4 rows, got 5"):
        mod.gemv(torch.empty(5, 16, device="cuda", dtype=torch.bfloat16), x, w, None)
    with pytest.raises(RuntimeError, match="columns"):
        mod.gemv(torch.empty(1, 16, device="cuda", dtype=torch.bfloat16), x[:1, :32], w, None)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_engine_with_gemv_matches_without(dtype, tiny_model_dir, prompts, monkeypatch):
    """The gemv kernel (default) for the 1-4 row linears of decode: logits stay within the kernel-path
    tolerance of the cuBLAS run (PDCLI_GEMV=0), and graph replays equal eager steps."""
    from pdcli import LLM, SamplingParams
    from tiny_models import pdcli_decode_logits

    path = tiny_model_dir("qwen3-gqa64")
    forced = prompts[3][:16]
    monkeypatch.setenv("PDCLI_GEMV", "0")
    base = pdcli_decode_logits(LLM(path, device="cuda", dtype=dtype, num_kv_blocks=64), prompts[2], forced)
    monkeypatch.setenv("PDCLI_GEMV", "always")  # the kernel on every 1-4 row shape, timed faster or not
    ours = pdcli_decode_logits(LLM(path, device="cuda", dtype=dtype, num_kv_blocks=64), prompts[2], forced)
    err = ((ours - base).norm() / base.norm()).item()
    assert err < (2e-2 if dtype == "bfloat16" else 3e-3), err
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    graphed = LLM(path, device="cuda", dtype=dtype, num_kv_blocks=128, max_num_seqs=4)
    eager = LLM(path, device="cuda", dtype=dtype, num_kv_blocks=128, max_num_seqs=4, enforce_eager=True)
    assert [o.token_ids for o in graphed.generate(prompts, p)] == [o.token_ids for o in eager.generate(prompts, p)]


@pytest.mark.parametrize("m, n, k", [(64, 4096, 14336), (8, 6144, 4096), (256, 28672, 4096)])
def test_every_cublaslt_candidate_matches_and_the_timed_choice_is_what_linear_runs(m, n, k):
    """kernels/blas_choice: each of the heuristic's cuBLASLt algorithms gives the default's result within bf16
    tolerance, and ops.linear computes a shape through the algorithm tune chose there (the timing runs here)."""
    from pdcli.kernels import blas_choice, ops

    mod = build.load_lt()
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
    w = (torch.randn(n, k, generator=gen, device="cuda") * k ** -0.5).to(torch.bfloat16)
    ref32 = torch.nn.functional.linear(x.float(), w.float())
    blobs, sizes = mod.lt_algos(m, n, k, k, True, blas_choice.MAX_ALGOS, blas_choice.WORKSPACE_BYTES)
    assert blobs.shape[0] >= 1 and (sizes <= blas_choice.WORKSPACE_BYTES).all()
    for i in range(blobs.shape[0]):
        a = blas_choice.Algo(i, blobs[i].contiguous())
        check(blas_choice.linear(x, w, a, mod), torch.nn.functional.linear(x, w), ref32, f"cuBLASLt #{i}")
    rows = blas_choice.tune([w, w.clone()], [m], mod)
    try:
        assert len(rows) == 1 and rows[0]["default_us"] > 0 and len(rows[0]["algos_us"]) == blobs.shape[0]
        chosen = blas_choice.algo(m, n, k)
        assert (chosen.index if chosen else None) == rows[0]["algo"]
        if chosen is not None:
            assert rows[0]["algos_us"][chosen.index] <= blas_choice.MARGIN * rows[0]["default_us"]
        check(ops.linear(x, w), torch.nn.functional.linear(x, w), ref32, "ops.linear")
    finally:
        blas_choice._choice.pop((m, n, k), None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows, vocab", [(1, 128256), (3, 151936), (64, 128256), (300, 32000), (5, 24), (2, 1000)])
def test_argmax_is_torchs(mod, dtype, rows, vocab):
    """The greedy sampler's argmax: torch.argmax's index on every row, ties (the first index), -inf rows, a NaN
    (above every number) and a largest value in a row's last, partial vector among them."""
    gen = torch.Generator(device="cuda").manual_seed(rows * vocab)
    x = torch.randn(rows, vocab, generator=gen, device="cuda").to(dtype)
    if rows >= 3:
        x[0, 7] = x[0, vocab - 3] = x[0].max() + 1  # a tie: the first index
        x[1] = float("-inf")
        x[2, vocab // 2] = float("nan")
    x[-1, vocab - 1] = x[-1].max() + 2
    got = mod.argmax(x)
    assert got.dtype == torch.int64 and torch.equal(got, x.argmax(dim=-1))
    from pdcli.kernels import ops

    assert torch.equal(ops.argmax(x[:, : vocab - 1]), x[:, : vocab - 1].argmax(dim=-1))  # a view, V - 1 wide
