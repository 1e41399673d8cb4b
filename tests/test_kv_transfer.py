"""The KV data plane's block gather/scatter (8-byte-word views) against plain indexing."""
import pytest
import torch

from pdcli.workers.kv_transfer import gather_layers, layer_groups, scatter_blocks, transfer_shape

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gather_scatter_equal_indexing(device, dtype):
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(3, 2, 11, 4, 2, 8, generator=g).to(device=device, dtype=dtype)  # [L, 2, N, bs, Hk, D]
    blocks = [7, 2, 10, 5]
    idx, dst_idx = torch.tensor(blocks, device=device), torch.arange(len(blocks), device=device)
    out = torch.cat([gather_layers(kv, sl, idx, dst_idx) for sl in (slice(0, 2), slice(2, 3))])
    assert out.shape == transfer_shape(kv, len(blocks))
    assert torch.equal(out, kv[:, :, blocks])
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
        mod.copy_blocks(got[..., : d // 2].contiguous(), src, src_idx, dst_idx)  # blocks of another size


@pytest.mark.parametrize("num_layers", [1, 2, 7, 8, 9, 28, 32, 36, 80])
def test_layer_groups_cover_every_layer_once_in_few_sends(num_layers):
    from pdcli.workers.kv_transfer import LAYER_SENDS

    groups = layer_groups(num_layers)
    assert [i for g in groups for i in range(num_layers)[g]] == list(range(num_layers))
    assert len(groups) <= LAYER_SENDS and all(g.stop > g.start for g in groups)


def test_layer_chunks_cover_every_layer_once():
    from pdcli.workers import kv_transfer

    kv = torch.zeros(7, 2, 4, 2, 1, 8)  # fp32: 128 bytes of K and V per block and layer
    assert kv_transfer.layer_chunks(kv, 1) == [slice(0, 7)]  # 64 MiB holds all
    old = kv_transfer.WHOLE_CHUNK_BYTES
    try:
        kv_transfer.WHOLE_CHUNK_BYTES = 3 * 2 * 128  # three layers of two blocks
        assert kv_transfer.layer_chunks(kv, 2) == [slice(0, 3), slice(3, 6), slice(6, 7)]
        kv_transfer.WHOLE_CHUNK_BYTES = 1
        assert kv_transfer.layer_chunks(kv, 2) == [slice(i, i + 1) for i in range(7)]
    finally:
        kv_transfer.WHOLE_CHUNK_BYTES = old


def _send_recv(rank: int, port: int, q) -> None:
    import torch.distributed as dist
    from pdcli.workers import kv_transfer

    kv_transfer.WHOLE_CHUNK_BYTES = 2 * 3 * 2 * 4 * 2 * 8 * 4  # two layers of 3 blocks (fp32)
    from datetime import timedelta

    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    g = kv_transfer.pair_group(store, "pair/0-1/", rank, torch.device("cpu"), "127.0.0.1", timedelta(seconds=60))
    try:
        src = torch.randn(5, 2, 9, 2, 4, 8, generator=torch.Generator().manual_seed(1))
        kv_transfer.LAYER_SENDS = 2  # layer-wise: layers 0-2, then 3-4
        if rank == 0:
            for rid, blocks in (("a", [4, 0, 7]), ("b", [2, 8, 1])):  # one announced group of two
                kv_transfer.wait_done(kv_transfer.send_kv(src, blocks, 1, 0, rid, None, None, g), None)
            sender = kv_transfer.LayerSender(src, [("c", [3, 5], 1, 0), ("d", [6, 0, 2, 8], 1, 0)], None, None, {1: g})
            for layer in range(src.shape[0]):
                sender(layer)
            for t in sender.transfers:
                kv_transfer.wait_done(t, None)
                assert len(t.works) == 2
        else:
            dst = torch.zeros_like(src)
            ts = kv_transfer.recv_kv(dst, [("a", 3, 0), ("b", 3, 0)], 0, False, None, None, g)
            for t, blocks, to in zip(ts, ([4, 0, 7], [2, 8, 1]), ([0, 1, 2], [3, 4, 5])):
                kv_transfer.wait_done(t, None)
                assert len(t.works) == 3  # layers 0-1, 2-3, 4
                kv_transfer.scatter_blocks(dst, to, t.bufs[0])
                assert torch.equal(dst[:, :, to], src[:, :, blocks])
            ts = kv_transfer.recv_kv(dst, [("c", 2, 0), ("d", 4, 0)], 0, True, None, None, g)
            for t, blocks, to in zip(ts, ([3, 5], [6, 0, 2, 8]), ([0, 1], [2, 3, 4, 5])):
                kv_transfer.wait_done(t, None)
                assert len(t.works) == 2
                kv_transfer.scatter_blocks(dst, to, t.bufs[0])
                assert torch.equal(dst[:, :, to], src[:, :, blocks])
        q.put(None)
    except Exception as err:  # noqa: BLE001
        q.put(repr(err))


def test_whole_and_layer_wise_sends_arrive_intact():

    import torch.multiprocessing as mp

    import torch.distributed as dist

    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    port = master.port
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_send_recv, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    errs = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert errs == [None, None]
