"""Worker layout: which (device, role) pairs to start, e.g. `--collocated cuda:0 --prefill cuda:1,cuda:3 --decode cuda:2`."""
from __future__ import annotations

from dataclasses import dataclass

ROLES = ("collocated", "prefill", "decode")


@dataclass(frozen=True)
class WorkerSpec:
    rank: int  # rank in the KV-transfer process group
    role: str  # collocated | prefill | decode
    device: str  # cpu | cuda:N
    node: int = 0  # the node it runs on (0: the head's)

    @property
    def place(self) -> str:
        """Where it runs, for what is shared: a GPU is one per (node, device) ("cuda:0" on the head,
        "n1/cuda:0" on node 1); CPU workers share nothing that matters ("cpu")."""
        return self.device if self.device == "cpu" or self.node == 0 else f"n{self.node}/{self.device}"


def parse_layout(collocated: str = "", prefill: str = "", decode: str = "", first_rank: int = 0,
                 node: int = 0, whole: bool = True) -> list[WorkerSpec]:
    """One worker per listed device, ranks in the order collocated, prefill, decode (from first_rank); whole:
    the layout must serve on its own (`check_layout`), not only as a part of a cluster's."""
    specs = []
    for role, devices in zip(ROLES, (collocated, prefill, decode)):
        for dev in filter(None, (d.strip() for d in (devices or "").split(","))):
            if dev != "cpu" and not (dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
                raise ValueError(f"bad device {dev!r} for --{role}: use cpu, cuda or cuda:N")
            specs.append(WorkerSpec(first_rank + len(specs), role, "cuda:0" if dev == "cuda" else dev, node))
    return check_layout(specs) if whole else specs


def check_layout(specs: list[WorkerSpec]) -> list[WorkerSpec]:
    """A layout that can serve: some worker, and prefill workers only with decode workers."""
    if not specs:
        raise ValueError("the layout has no workers: give --collocated, or --prefill with --decode")
    roles = {s.role for s in specs}
    if ("prefill" in roles) != ("decode" in roles):
        raise ValueError("disaggregation needs at least one --prefill and one --decode worker")
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
