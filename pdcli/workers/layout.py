"""Worker layout: which (device, role) pairs to start, e.g. `--collocated cuda:0 --prefill cuda:1,cuda:3 --decode cuda:2`."""
from __future__ import annotations

from dataclasses import dataclass

ROLES = ("collocated", "prefill", "decode")


@dataclass(frozen=True)
class WorkerSpec:
    rank: int  # rank in the KV-transfer process group
    role: str  # collocated | prefill | decode
    device: str  # cpu | cuda:N


def parse_layout(collocated: str = "", prefill: str = "", decode: str = "") -> list[WorkerSpec]:
    """One worker per listed device, ranks in the order collocated, prefill, decode."""
    specs = []
    for role, devices in zip(ROLES, (collocated, prefill, decode)):
        for dev in filter(None, (d.strip() for d in (devices or "").split(","))):
            if dev != "cpu" and not (dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
                raise ValueError(f"bad device {dev!r} for --{role}: use cpu, cuda or cuda:N")
            specs.append(WorkerSpec(len(specs), role, "cuda:0" if dev == "cuda" else dev))
    if not specs:
        raise ValueError("the layout has no workers: give --collocated, or --prefill with --decode")
    roles = {s.role for s in specs}
    if ("prefill" in roles) != ("decode" in roles):
        raise ValueError("disaggregation needs at least one --prefill and one --decode worker")
    return specs


def transfer_pair(prefill: WorkerSpec, decode: WorkerSpec) -> str:
    """How KV moves from this prefill worker to this decode worker: the key of its fitted transfer cost."""
    if prefill.device == "cpu" or decode.device == "cpu":
        return "cpu-gloo"
    return "gpu-ipc" if prefill.device == decode.device else "gpu-nccl"


def collocated_only(layout: list[WorkerSpec], mode: str) -> bool:
    """A layout of collocated workers only, on two or more devices, run in a mode that may disaggregate:
    its collocated workers then prefill and decode for each other (CentralScheduler's pd_on_collocated)."""
    return mode != "collocated" and all(s.role == "collocated" for s in layout) and \
        (len({s.device for s in layout}) >= 2 or (len(layout) >= 2 and layout[0].device == "cpu"))
