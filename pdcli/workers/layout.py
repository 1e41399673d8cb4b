"""Worker layout: which (device, role) pairs to start, e.g. `--collocated cuda:0 --prefill cuda:1,cuda:3 --decode cuda:2`."""
from __future__ import annotations

from dataclasses import dataclass

ROLES = ("collocated", "prefill", "decode")


@dataclass(frozen=True)
class WorkerSpec:
    rank: int  # rank in the KV-transfer process group
    role: str  # collocated | prefill | decode
    device: str  # cpu | cuda:N (with tensor parallelism: rank 0's)
    node: int = 0  # the node it runs on (0: the head's)
    tp_devices: tuple[str, ...] = ()  # tensor parallelism: every rank's device, rank 0's first; () for one

    @property
    def tp_size(self) -> int:
        return max(1, len(self.tp_devices))

    @property
    def place(self) -> str:
        """Where it runs, for what is shared: a GPU is one per (node, device) ("cuda:0" on the head,
        "n1/cuda:0" on node 1); CPU workers share nothing that matters ("cpu")."""
        return self.device if self.device == "cpu" or self.node == 0 else f"n{self.node}/{self.device}"


def parse_layout(collocated: str = "", prefill: str = "", decode: str = "", first_rank: int = 0,
                 node: int = 0, whole: bool = True, tp: int = 1) -> list[WorkerSpec]:
    """One worker per listed device, ranks in the order collocated, prefill, decode (from first_rank); whole:
    the layout must serve on its own (`check_layout`), not only as a part of a cluster's. With tp > 1 each
    worker spans tp devices: a `+` group (`cuda:0+cuda:1`), or tp consecutive GPUs of a plain list, or tp
    CPU ranks for `cpu`."""
    specs = []
    for role, devices in zip(ROLES, (collocated, prefill, decode)):
        for group in _groups(role, [d.strip() for d in (devices or "").split(",") if d.strip()], tp):
            tp_devices = tuple(group) if len(group) > 1 else ()
            specs.append(WorkerSpec(first_rank + len(specs), role, group[0], node, tp_devices))
    return check_layout(specs) if whole else specs


def _device(role: str, dev: str) -> str:
    if dev != "cpu" and not (dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ValueError(f"bad device {dev!r} for --{role}: use cpu, cuda or cuda:N")
    return "cuda:0" if dev == "cuda" else dev


def _groups(role: str, items: list[str], tp: int) -> list[list[str]]:
    """The devices of each worker of a role."""
    if tp < 1:
        raise ValueError(f"--tensor-parallel-size must be at least 1, got {tp}")
    out, plain = [], []
    for item in items:
        group = [_device(role, d.strip()) for d in item.split("+")]
        if len(group) > 1:
            if len(group) != tp:
                raise ValueError(f"--{role} {item} is a group of {len(group)} devices but --tensor-parallel-size is {tp}")
            out.append(group)
        elif group[0] == "cpu":
            out.append(["cpu"] * tp)
        else:
            plain.append(group[0])
    if len(plain) % tp:
        raise ValueError(f"--{role} lists {len(plain)} GPU(s): not a multiple of --tensor-parallel-size {tp}")
    return out + [plain[i:i + tp] for i in range(0, len(plain), tp)]


def check_layout(specs: list[WorkerSpec]) -> list[WorkerSpec]:
    """A layout that can serve: some worker, decode workers only with prefill workers, and prefill workers only with
    decode workers or a collocated worker beside each to hand back to."""
    if not specs:
        raise ValueError("the layout has no workers: give --collocated, or --prefill with --decode")
    roles = {s.role for s in specs}
    beside = {s.place for s in specs if s.role == "collocated"}
    if ("decode" in roles and "prefill" not in roles) or ("prefill" in roles and "decode" not in roles and any(
            s.role == "prefill" and s.place not in beside for s in specs)):
        raise ValueError("disaggregation needs at least one --prefill and one --decode worker (or a --prefill worker "
                         "on the device of a --collocated one, which it prefills for)")
    return specs


def transfer_pair(prefill: WorkerSpec, decode: WorkerSpec) -> str:
    """How KV moves from this prefill worker to this decode worker: the key of its fitted transfer cost."""
    if prefill.node != decode.node:
        return "net"
    if prefill.device == "cpu" or decode.device == "cpu":
        return "cpu-gloo"
    return "gpu-ipc" if prefill.device == decode.device else "gpu-nccl"


def collocated_only(layout: list[WorkerSpec], mode: str) -> bool:
    """A layout of collocated workers only, on two or more devices, run in a mode that may disaggregate:
    its collocated workers then prefill and decode for each other (CentralScheduler's pd_on_collocated)."""
    return mode != "collocated" and all(s.role == "collocated" for s in layout) and \
        (len({s.place for s in layout}) >= 2 or (len(layout) >= 2 and layout[0].device == "cpu"))


def prefill_beside_collocated(layout: list[WorkerSpec]) -> bool:
    """Prefill workers that share their place with a collocated worker and no decode worker (one GPU's C + P):
    they prefill for it and hand the KV back (through CUDA IPC), so the GPU keeps one decode batch."""
    decode_places = {s.place for s in layout if s.role == "decode"}
    coll_places = {s.place for s in layout if s.role == "collocated"}
    return any(s.role == "prefill" and s.place in coll_places and s.place not in decode_places for s in layout)


def pd_on_collocated(layout: list[WorkerSpec], mode: str) -> bool:
    """Whether collocated workers take part in P/D handoffs (CentralScheduler's pd_on_collocated): two or more
    collocated workers serving each other, or a prefill worker handing back to the collocated one beside it."""
    return collocated_only(layout, mode) or (mode != "collocated" and prefill_beside_collocated(layout))
