"""The KV data plane's block gather/scatter (8-byte-word views) against plain indexing."""
import pytest
import torch

from pdcli.workers.kv_transfer import gather_blocks, gather_layer, scatter_blocks, transfer_shape

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gather_scatter_equal_indexing(device, dtype):
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(3, 2, 11, 4, 2, 8, generator=g).to(device=device, dtype=dtype)  # [L, 2, N, bs, Hk, D]
    blocks = [7, 2, 10, 5]
    out = gather_blocks(kv, blocks)
    assert out.shape == transfer_shape(kv, len(blocks))
    assert torch.equal(out, kv[:, :, blocks])
    for layer in range(3):
        assert torch.equal(gather_layer(kv, layer, torch.tensor(blocks, device=device)), kv[layer][:, blocks])
    dst = torch.zeros_like(kv)
    scatter_blocks(dst, [1, 3, 9, 0], out)
    assert torch.equal(dst[:, :, [1, 3, 9, 0]], out)
    untouched = [i for i in range(11) if i not in (1, 3, 9, 0)]
    assert not dst[:, :, untouched].any()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block_size,hk,d", [(16, 8, 128), (8, 2, 64), (1, 1, 8)])
def test_copy_blocks_kernel_matches_reference(dtype, block_size, hk, d):
    """The block-copy kernel (gather, scatter, pool to pool) against the torch reference on fresh random
    pools, shuffled indices and pools of different sizes."""
    from pdcli.kernels import build, reference

    mod = build.get()
    g = torch.Generator(device="cuda").manual_seed(block_size * 131 + hk)
    src = torch.randn(6, 37, block_size, hk, d, generator=g, device="cuda").to(dtype)  # [G, Ns, ...]
    for nd in (37, 11):
        src_idx = torch.randperm(37, generator=g, device="cuda")[:9]
        dst_idx = torch.randperm(nd, generator=g, device="cuda")[:9]
        want = torch.randn(6, nd, block_size, hk, d, generator=g, device="cuda").to(dtype)
        got = want.clone()
        reference.copy_blocks(want, src, src_idx, dst_idx)
        mod.copy_blocks(got, src, src_idx, dst_idx)
        assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="copy_blocks"):
        mod.copy_blocks(got[:, :, :1].contiguous(), src, src_idx, dst_idx)  # blocks of another size
