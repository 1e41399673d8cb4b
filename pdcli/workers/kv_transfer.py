"""KV data plane between workers: a sequence's blocks, all layers, as one tensor over torch.distributed
point-to-point (gloo on CPU, NCCL between GPUs). Control messages never carry KV."""
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
    """An in-flight isend / irecv of one request's KV; completion is learnt through work.wait() (gloo's
    is_completed() stays false until then), on the worker's wait thread."""

    def __init__(self, request_id: str, work, buf: torch.Tensor, blocks: list[int]):
        self.request_id, self.work, self.buf, self.blocks = request_id, work, buf, blocks

    @property
    def nbytes(self) -> int:
        return self.buf.numel() * self.buf.element_size()


def send_kv(kv_cache: torch.Tensor, blocks: list[int], dst: int, tag: int, request_id: str) -> PendingTransfer:
    buf = gather_blocks(kv_cache, blocks)
    return PendingTransfer(request_id, dist.isend(buf, dst, tag=tag), buf, blocks)


def recv_kv(kv_cache: torch.Tensor, blocks: list[int], src: int, tag: int, request_id: str) -> PendingTransfer:
    buf = torch.empty(transfer_shape(kv_cache, len(blocks)), dtype=kv_cache.dtype, device=kv_cache.device)
    return PendingTransfer(request_id, dist.irecv(buf, src, tag=tag), buf, blocks)
