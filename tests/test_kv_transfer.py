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
