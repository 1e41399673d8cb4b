"""Tensor parallelism's process group: the ranks of one worker split over devices (vLLM's
tensor_parallel_size). The group is set for the process before the model is built; every parallel layer
reads it then. Size 1 (the default): every collective is the identity."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

TP_TIMEOUT_S = 60.0  # a collective with a dead or hung rank fails after this long, never hangs the worker


@dataclass
class TPGroup:
    rank: int = 0
    size: int = 1
    backend: object = None  # a gloo or NCCL process group of `size` ranks; None when size is 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place."""
        if self.size > 1:
            self.backend.allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., size * n], rank-major."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.backend.allgather([parts], [x]).wait()
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Rank root's x on every rank, in place."""
        if self.size > 1:
            opts = dist.BroadcastOptions()
            opts.rootRank = root
            self.backend.broadcast([x], opts).wait()
        return x

    def min(self, value: int) -> int:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.cpu_backend().allreduce([t], opts).wait()
        return int(t.item())

    def cpu_backend(self):
        """A gloo group for host values (the NCCL one takes device tensors only)."""
        return getattr(self, "_cpu", None) or self.backend


_TP = TPGroup()


def get_tp() -> TPGroup:
    return _TP


def set_tp(group: TPGroup) -> None:
    global _TP
    _TP = group


@contextmanager
def using_tp(group: TPGroup):
    """The group set while a model is built (its layers keep it); the single-rank one again after."""
    prev = get_tp()
    set_tp(group)
    try:
        yield group
    finally:
        set_tp(prev)


def tp_group(store, prefix: str, rank: int, size: int, device: torch.device, host: str = "127.0.0.1",
             timeout_s: float = TP_TIMEOUT_S) -> TPGroup:
    """Join the worker's TP group under `prefix` of `store` (gloo on CPUs bound to host; NCCL on GPUs, with a
    gloo group beside it for host values)."""
    timeout = timedelta(seconds=timeout_s)

    def gloo(pfx: str):
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return dist.ProcessGroupGloo(dist.PrefixStore(pfx, store), rank, size, opts)

    if device.type == "cpu":
        return TPGroup(rank, size, gloo(prefix))
    opts = dist.ProcessGroupNCCL.Options()  # as torch's own new_group sets one up
    opts.is_high_priority_stream = False
    opts._timeout = timeout
    opts.group_name = prefix
    backend = dist.ProcessGroupNCCL(dist.PrefixStore(prefix, store), rank, size, opts)
    backend._set_sequence_number_for_group()
    g = TPGroup(rank, size, backend)
    g._cpu = gloo(prefix + "cpu/")
    g.all_reduce(torch.zeros(1, device=device))  # the communicator made now, not inside a CUDA graph's capture
    torch.cuda.synchronize(device)
    return g


def shard_range(n: int, tp: TPGroup) -> tuple[int, int]:
    """This rank's [start, end) of n rows split evenly (n divisible by tp.size)."""
    per = n // tp.size
    return tp.rank * per, (tp.rank + 1) * per


def kv_head_range(num_kv_heads: int, tp: TPGroup) -> tuple[int, int]:
    """vLLM's rule: KV heads split when tp divides them, else replicated when tp is a multiple of them (rank r
    holds head r // (tp / heads))."""
    if num_kv_heads % tp.size == 0:
        return shard_range(num_kv_heads, tp)
    h = tp.rank // (tp.size // num_kv_heads)
    return h, h + 1


def check_tp(num_heads: int, num_kv_heads: int, size: int) -> None:
    """A clear error for a split the model cannot take."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {size}")
    if num_heads % size:
        raise ValueError(f"tensor_parallel_size {size} does not divide the model's {num_heads} attention heads")
    if num_kv_heads % size and size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size {size} neither divides the model's {num_kv_heads} KV heads nor is a "
                         f"multiple of them")
