"""KV data plane between workers: a sequence's blocks, all layers, as one tensor over torch.distributed
point-to-point (gloo on CPU, NCCL between GPUs), or, between two workers on one GPU (which NCCL cannot
pair), one device copy straight into the decode worker's pool mapped through CUDA IPC. Control
messages never carry KV."""
from __future__ import annotations

import torch
import torch.distributed as dist


def gather_blocks(kv_cache: torch.Tensor, blocks: list[int]) -> torch.Tensor:
    # kv_cache [layers, 2, num_blocks, block_size, Hk, D] -> [layers, 2, len(blocks), block_size, Hk, D]
    return kv_cache.index_select(2, torch.tensor(blocks, device=kv_cache.device))


def scatter_blocks(kv_cache: torch.Tensor, blocks: list[int], data: torch.Tensor) -> None:
    kv_cache.index_copy_(2, torch.tensor(blocks, device=kv_cache.device), data)


def transfer_shape(kv_cache: torch.Tensor, num_blocks: int) -> tuple[int, ...]:
    shape = list(kv_cache.shape)
    shape[2] = num_blocks
    return tuple(shape)


class PendingTransfer:
    """An in-flight isend / irecv / IPC copy of one request's KV; completion is learnt through
    work.wait() (gloo's is_completed() stays false until then), on the worker's wait thread."""

    def __init__(self, request_id: str, work, buf: torch.Tensor, blocks: list[int], peer: int | None = None):
        self.request_id, self.work, self.buf, self.blocks = request_id, work, buf, blocks
        self.peer = peer  # the decode worker's rank, for an IPC copy

    @property
    def nbytes(self) -> int:
        return self.buf.numel() * self.buf.element_size()


def send_kv(kv_cache: torch.Tensor, blocks: list[int], dst: int, tag: int, request_id: str) -> PendingTransfer:
    buf = gather_blocks(kv_cache, blocks)
    return PendingTransfer(request_id, dist.isend(buf, dst, tag=tag), buf, blocks)


def recv_kv(kv_cache: torch.Tensor, blocks: list[int], src: int, tag: int, request_id: str) -> PendingTransfer:
    buf = torch.empty(transfer_shape(kv_cache, len(blocks)), dtype=kv_cache.dtype, device=kv_cache.device)
    return PendingTransfer(request_id, dist.irecv(buf, src, tag=tag), buf, blocks)


class EventWork:
    """A recorded CUDA event behind the `wait()` of a dist Work."""

    def __init__(self):
        self.event = torch.cuda.Event()
        self.event.record()

    def wait(self) -> None:
        self.event.synchronize()


def export_pool(kv_cache: torch.Tensor) -> tuple:
    """A picklable CUDA IPC handle of a KV pool (torch's own tensor reduction), for a worker on the same GPU."""
    from torch.multiprocessing.reductions import reduce_tensor

    return reduce_tensor(kv_cache)[1]


def import_pool(handle: tuple) -> torch.Tensor:
    """The pool of another process on this GPU, mapped into this one."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return rebuild_cuda_tensor(*handle)


def copy_kv_ipc(kv_cache: torch.Tensor, blocks: list[int], peer_pool: torch.Tensor, peer_blocks: list[int],
                peer: int, request_id: str, stream: torch.cuda.Stream) -> PendingTransfer:
    """Copy a sequence's blocks (all layers) into another process's pool on this GPU: one gather, one
    scatter, on a side stream that starts after the work queued so far (the prefill that wrote them) and
    overlaps the prefill steps after it; done when the event recorded on that stream is. The blocks stay
    held until then."""
    written = torch.cuda.Event()
    written.record()
    with torch.cuda.stream(stream):
        stream.wait_event(written)
        buf = gather_blocks(kv_cache, blocks)
        peer_pool.index_copy_(2, torch.tensor(peer_blocks, device=kv_cache.device), buf)
        work = EventWork()
    return PendingTransfer(request_id, work, buf, blocks, peer=peer)
