"""KV data plane between workers: a sequence's blocks over torch.distributed point-to-point (gloo on CPU,
NCCL between GPUs), either in groups of layers while its last prefill chunk runs or all layers after it;
or, between two workers on one GPU (which NCCL cannot pair), one device copy straight into the decode
worker's pool mapped through CUDA IPC. Control messages never carry KV.

NCCL matches the sends and receives of a pair of ranks by order, not by tag: the prefill worker decides
the order and announces each group of sends; the decode worker posts its receives in announced order.
Each (prefill, decode) pair has its own two-rank process group (`pair_group`)."""
from __future__ import annotations

import contextlib
from datetime import timedelta
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pdcli.kernels import ops


class PairGroup:
    """The process group of one (prefill, decode) pair, of its own: two ranks, the sender 0 and the receiver
    1, created on the coordinator's store under the pair's prefix when the pair is made (workers/peers.py).
    Pairs come and go without touching the others; no global world."""

    def __init__(self, backend, peer: int):
        self.backend, self.peer = backend, peer  # peer: the other side's rank in this group (0 or 1)

    def isend(self, t: torch.Tensor, tag: int):
        return self.backend.send([t], self.peer, tag)

    def irecv(self, t: torch.Tensor, tag: int):
        return self.backend.recv([t], self.peer, tag)


def pair_group(store, prefix: str, me: int, device: torch.device, host: str, timeout: timedelta) -> PairGroup:
    """Join the two-rank group under `prefix` of `store` as rank `me` (0: sender, 1: receiver): gloo on the
    CPU, bound to `host` (never every interface); NCCL between GPUs, connected at once by one send (set up
    lazily, the first receive would block in the set-up until its sender's first send, which waits for that
    very receive). Blocks until the peer joins or `timeout` passes."""
    prefixed = dist.PrefixStore(prefix, store)
    if device.type == "cpu":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return PairGroup(dist.ProcessGroupGloo(prefixed, me, 2, opts), 1 - me)
    opts = dist.ProcessGroupNCCL.Options()  # as torch's own new_group sets one up
    opts.is_high_priority_stream = False
    opts._timeout = timeout
    opts.group_name = prefix
    backend = dist.ProcessGroupNCCL(prefixed, me, 2, opts)
    backend._set_sequence_number_for_group()
    g = PairGroup(backend, 1 - me)
    x = torch.zeros(1, device=device)
    (g.isend(x, 0) if me == 0 else g.irecv(x, 0)).wait()
    torch.cuda.synchronize(device)
    return g


def block_index(kv_cache: torch.Tensor, blocks: list[int]) -> torch.Tensor:
    return torch.tensor(blocks, device=kv_cache.device)


def _groups(x: torch.Tensor) -> torch.Tensor:
    # [layers, 2, N, ...] -> [layers * 2, N, ...]: a view
    return x.view(x.shape[0] * x.shape[1], *x.shape[2:])


def gather_layers(kv_cache: torch.Tensor, layers: slice, idx: torch.Tensor, dst_idx: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    # -> out [len(layers), 2, len(idx), block_size, Hk, D] (new if None); dst_idx: arange(len(idx)) on the device
    if out is None:
        out = torch.empty(transfer_shape(kv_cache[layers], len(idx)), dtype=kv_cache.dtype, device=kv_cache.device)
    ops.copy_blocks(_groups(out), _groups(kv_cache[layers]), idx, dst_idx)
    return out


def scatter_blocks(kv_cache: torch.Tensor, blocks: list[int], data: torch.Tensor) -> None:
    ops.copy_blocks(_groups(kv_cache), _groups(data), torch.arange(len(blocks), device=kv_cache.device),
                    block_index(kv_cache, blocks))


WHOLE_CHUNK_BYTES = 64 << 20  # a whole send goes as groups of layers of about this size: the gather of one
# overlaps the NCCL send of the one before


def _runs(num_layers: int, k: int) -> list[slice]:
    """Consecutive layers, k at a time (the last run may be shorter)."""
    return [slice(i, min(i + k, num_layers)) for i in range(0, num_layers, k)]


def layer_chunks(kv_cache: torch.Tensor, num_blocks: int) -> list[slice]:
    """The groups of layers a whole transfer of num_blocks blocks is sent in; sender and receiver agree on them
    (NCCL pairs a send with a receive of the same size)."""
    layers = kv_cache.shape[0]
    per_layer = num_blocks * kv_cache[0, :, 0].numel() * kv_cache.element_size()
    return _runs(layers, max(1, min(layers, WHOLE_CHUNK_BYTES // max(1, per_layer))))


LAYER_SENDS = 8  # a layer-wise transfer goes in this many groups of consecutive layers, each sent once its last
# layer is queued: the host posts 8 gathers and sends per sequence, not one per layer (~60 us each)


def layer_groups(num_layers: int) -> list[slice]:
    """The groups of layers a layer-wise transfer is sent in; sender and receiver agree on them."""
    return _runs(num_layers, -(-num_layers // LAYER_SENDS))


def transfer_shape(kv_cache: torch.Tensor, num_blocks: int) -> tuple[int, ...]:
    shape = list(kv_cache.shape)
    shape[2] = num_blocks
    return tuple(shape)


def timing_event(stream: torch.cuda.Stream | None = None) -> torch.cuda.Event:
    ev = torch.cuda.Event(enable_timing=True)
    ev.record(stream)
    return ev


@dataclass(eq=False)
class PendingTransfer:
    """An in-flight send / receive / IPC copy of one request's KV. `works` complete in order; gloo's learn
    their completion only through wait(), so a thread per peer waits on them."""
    request_id: str
    peer: int  # the other worker's rank
    blocks: list[int]
    bufs: list[torch.Tensor] = field(default_factory=list)  # what the works read or write; held until done
    works: list = field(default_factory=list)
    kind: str = "whole"  # whole | layers | ipc
    started: torch.cuda.Event | None = None  # device time the transfer could start (whole), or the end of
    # the prefill compute it overlapped (layers): the reported time runs from here to `done`
    done: torch.cuda.Event | None = None  # completes with the last work (see mark_done)
    nbytes: int = 0

    def add(self, buf: torch.Tensor, work) -> None:
        self.bufs.append(buf)
        self.works.append(work)
        self.nbytes += buf.numel() * buf.element_size()


def mark_done(t: PendingTransfer, stream: torch.cuda.Stream | None) -> None:
    """Give t an event that completes with its last work, recorded now on `stream` (which does nothing
    else), so its end is timed on the device, not when a host thread gets to it. A pair's NCCL ops
    complete in order, so the last one's end is the transfer's."""
    if stream is None:
        return
    with torch.cuda.stream(stream):
        t.works[-1].wait()  # NCCL: this stream waits for the op; the host does not
        t.done = timing_event(stream)


def send_kv(kv_cache: torch.Tensor, blocks: list[int], dst: int, tag: int, request_id: str,
            stream: torch.cuda.Stream | None, timing: torch.cuda.Stream | None, group: PairGroup) -> PendingTransfer:
    """All layers after the work queued so far (the prefill that wrote them), in `layer_chunks`: each group
    gathered on `stream` and sent while the next is gathered."""
    t = PendingTransfer(request_id, dst, blocks)
    if stream is not None:
        written = torch.cuda.Event()
        written.record()
        stream.wait_event(written)
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        if stream is not None:
            t.started = timing_event(stream)
        # allocated on `stream`, which reads them: their memory is not reused before it has
        idx = block_index(kv_cache, blocks)
        dst_idx = torch.arange(len(blocks), device=kv_cache.device)
        buf = torch.empty(transfer_shape(kv_cache, len(blocks)), dtype=kv_cache.dtype, device=kv_cache.device)
        for sl in layer_chunks(kv_cache, len(blocks)):
            part = gather_layers(kv_cache, sl, idx, dst_idx, out=buf[sl])
            t.add(part, group.isend(part, tag))
    mark_done(t, timing)
    return t


class LayerSender:
    """Sends the KV of sequences whose last prefill chunk is in this step, in `layer_groups`: once the last
    layer of a group is queued, a side stream gathers the group's blocks and NCCL sends them while the
    layers after it compute. Sends go group-major (group 0 of every sequence, then group 1, ...); `recv_kv`
    posts receives the same way."""

    def __init__(self, kv_cache: torch.Tensor, items: list[tuple[str, list[int], int, int]],
                 stream: torch.cuda.Stream | None, timing: dict[int, torch.cuda.Stream] | None,
                 groups: dict[int, PairGroup]):
        # items: (request id, blocks, dst rank, tag); timing: a stream per dst rank for mark_done; groups: the
        # pair's process group per dst rank
        self.kv_cache, self.stream, self.timing, self.groups = kv_cache, stream, timing, groups
        self.spec = items  # what a tensor-parallel follower sends of its shard (distributed/tp_kv.py)
        self.num_layers = kv_cache.shape[0]
        self.send_after = {g.stop - 1: g for g in layer_groups(self.num_layers)}  # last layer -> its group
        dev = kv_cache.device
        self.items = [(PendingTransfer(rid, dst, blocks, kind="layers"), block_index(kv_cache, blocks),
                       torch.arange(len(blocks), device=dev), tag) for rid, blocks, dst, tag in items]
        if stream is not None:
            for _, idx, dst_idx, _ in self.items:
                idx.record_stream(stream)  # read there after this step may have freed it
                dst_idx.record_stream(stream)

    @property
    def transfers(self) -> list[PendingTransfer]:
        return [t for t, *_ in self.items]

    def __call__(self, layer: int) -> None:
        """Called after layer `layer` of the forward pass is queued (its K/V stores included)."""
        group = self.send_after.get(layer)
        if group is None:
            return
        if self.stream is None:
            self._send(group)
            return
        last = layer == self.num_layers - 1
        computed = torch.cuda.Event(enable_timing=last)
        computed.record()
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(computed)
            self._send(group)
        if last:
            for t, *_ in self.items:
                t.started = computed  # the prefill's last layer: what stays exposed is measured from here
                mark_done(t, self.timing[t.peer])

    def _send(self, layers: slice) -> None:
        for t, idx, dst_idx, tag in self.items:
            buf = gather_layers(self.kv_cache, layers, idx, dst_idx)  # [len(layers), 2, n, block_size, Hk, D]
            t.add(buf, self.groups[t.peer].isend(buf, tag))


def recv_kv(kv_cache: torch.Tensor, items: list[tuple[str, int, int]], src: int, layers: bool,
            stream: torch.cuda.Stream | None, timing: torch.cuda.Stream | None, group: PairGroup) -> list[PendingTransfer]:
    """Post the receives of one announced group of sends from `src`, in its order. items: (request id,
    number of blocks, tag). The KV lands in a buffer per request; `scatter_blocks` moves it into the
    reserved blocks (if they are still reserved) once complete."""
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        bufs = [torch.empty(transfer_shape(kv_cache, n), dtype=kv_cache.dtype, device=kv_cache.device)
                for _, n, _ in items]
        ts = [PendingTransfer(rid, src, [], kind="layers" if layers else "whole") for rid, _, _ in items]
        if layers:  # group-major, as LayerSender sends
            for sl in layer_groups(kv_cache.shape[0]):
                for t, buf, (_, _, tag) in zip(ts, bufs, items):
                    t.add(buf[sl], group.irecv(buf[sl], tag))
        else:  # request by request, each in the groups send_kv sends
            for t, buf, (_, n, tag) in zip(ts, bufs, items):
                for sl in layer_chunks(kv_cache, n):
                    t.add(buf[sl], group.irecv(buf[sl], tag))
    for t, buf in zip(ts, bufs):
        t.bufs = [buf]  # the whole buffer, for the scatter
        mark_done(t, timing)
    return ts


class EventWork:
    """A recorded CUDA event behind the `wait()` of a dist Work."""

    def __init__(self, stream: torch.cuda.Stream | None = None):
        self.event = torch.cuda.Event(enable_timing=True)
        self.event.record(stream)

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
    """Copy a sequence's blocks (all layers) into another process's pool on this GPU: one block copy
    pool to pool, on a side stream that starts after the work queued so far (the prefill that wrote them) and
    overlaps the prefill steps after it; done when the event recorded on that stream is. The blocks stay
    held until then."""
    written = torch.cuda.Event()
    written.record()
    t = PendingTransfer(request_id, peer, blocks, kind="ipc")
    with torch.cuda.stream(stream):
        stream.wait_event(written)
        t.started = timing_event(stream)
        ops.copy_blocks(_groups(peer_pool), _groups(kv_cache), block_index(kv_cache, blocks),
                        block_index(kv_cache, peer_blocks))
        t.works.append(EventWork(stream))
    t.nbytes = len(blocks) * kv_cache[:, :, 0].numel() * kv_cache.element_size()
    return t


def wait_done(t: PendingTransfer, stream: torch.cuda.Stream | None) -> float | None:
    """Block until every work of t is done. Its device time in seconds from t.started, or None where
    there is none (CPU; a receive)."""
    if stream is None or t.kind == "ipc":
        for w in t.works:
            w.wait()
        if t.kind == "ipc":
            return max(0.0, t.started.elapsed_time(t.works[-1].event) / 1e3)
        return None
    if t.done is None:
        mark_done(t, stream)
    t.done.synchronize()
    return max(0.0, t.started.elapsed_time(t.done) / 1e3) if t.started is not None else None
