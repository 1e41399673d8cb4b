"""The layouts `pdcli plan` compares on N GPUs, and simulating one of them at a rate."""
from __future__ import annotations

import functools
from dataclasses import dataclass

from pdcli.bench.arrivals import arrival_times
from pdcli.bench.metrics import summarize
from pdcli.config import CacheConfig
from pdcli.bench.workloads import make_requests
from pdcli.plan.sim import SimSpec
from pdcli.plan.simulator import Simulator, block_hashes

BLOCK_SIZE = CacheConfig.block_size  # the engine's default: prefix-cache hits come in whole blocks


@dataclass(frozen=True)
class Layout:
    name: str  # e.g. 8C, 2P6D, adaptive-8C
    mode: str  # the routing policy: collocated | disaggregated | adaptive
    specs: tuple[SimSpec, ...]
    pd_on_collocated: bool = False


def devices(gpus: int, gpus_per_node: int) -> list[str]:
    return [f"node{i // gpus_per_node}:cuda:{i % gpus_per_node}" for i in range(gpus)]


def enumerate_layouts(gpus: int, gpus_per_node: int) -> list[Layout]:
    """All collocated; xPyD for every split; adaptive over collocated workers that prefill and decode for
    each other (as `pdcli bench` lays them out)."""
    devs = devices(gpus, gpus_per_node)
    coll = tuple(SimSpec(i, "collocated", d) for i, d in enumerate(devs))
    out = [Layout(f"{gpus}C", "collocated", coll)]
    for p in range(1, gpus):
        specs = tuple(SimSpec(i, "prefill" if i < p else "decode", d) for i, d in enumerate(devs))
        out.append(Layout(f"{p}P{gpus - p}D", "disaggregated", specs))
    if gpus >= 2:
        out.append(Layout(f"adaptive-{gpus}C", "adaptive", coll, pd_on_collocated=True))
    else:  # one GPU, as `pdcli bench` lays it out: P and D on it (MPS), or C and P with the router choosing
        d = devs[0]  # whether P prefills for C
        out.append(Layout("1P1D-shared", "disaggregated", (SimSpec(0, "prefill", d), SimSpec(1, "decode", d))))
        out.append(Layout("adaptive-CP-shared", "adaptive", (SimSpec(0, "collocated", d), SimSpec(1, "prefill", d)),
                          pd_on_collocated=True))
    return out


def parse_layouts(text: str, gpus_per_node: int) -> list[Layout]:
    """Explicit layouts: "8C", "2P6D", "adaptive-8C", one GPU's "1P1D-shared" and "adaptive-CP-shared", comma
    separated."""
    out = []
    for name in filter(None, (t.strip() for t in text.split(","))):
        n = name.removeprefix("adaptive-")
        try:
            if name.endswith("-shared"):
                found = [lay for lay in enumerate_layouts(1, gpus_per_node) if lay.name == name]
            elif n.endswith("C") and n[:-1].isdigit():
                gpus = int(n[:-1])
                found = [lay for lay in enumerate_layouts(gpus, gpus_per_node) if lay.name == name]
            else:
                p, d = n.split("P")
                gpus = int(p) + int(d.removesuffix("D"))
                found = [lay for lay in enumerate_layouts(gpus, gpus_per_node) if lay.name == name]
        except ValueError:
            found = []
        if not found:
            raise ValueError(f"bad layout {name!r}: use NC, xPyD, adaptive-NC (e.g. 8C, 2P6D, adaptive-8C), "
                             "1P1D-shared or adaptive-CP-shared")
        out += found
    return out


def cross_node(layout: Layout) -> bool:
    """Some P/D pair of the layout hands KV from one node to another."""
    nodes = {s.device.split(":")[0] for s in layout.specs}
    return len(nodes) > 1 and (layout.mode != "collocated")


def simulate(layout: Layout, cm, rate: float, workload: str, duration: float, seed: int, slos: dict,
             vocab: int = 32000, max_model_len: int = 16384, burstiness: float = 1.0, router_factory=None,
             net_gbps: float | None = None) -> dict:
    """The layout's metrics at one rate over `duration` s of arrivals (pdcli bench's generators)."""
    n = max(1, int(rate * duration))
    lens, outs, hashes = sim_requests(workload, n, seed, vocab, max_model_len, BLOCK_SIZE)
    router = router_factory() if router_factory and layout.mode == "adaptive" else None
    sim = Simulator(cm, list(layout.specs), layout.mode, layout.pd_on_collocated, router, net_gbps=net_gbps,
                    block_size=BLOCK_SIZE)
    recs = sim.run(lens, outs, arrival_times(n, rate, burstiness, seed), hashes=hashes)
    return summarize(recs, slos)


@functools.lru_cache(maxsize=1)  # the layouts of a plan meet the same requests at a rate (search.at_rates)
def sim_requests(workload: str, n: int, seed: int, vocab: int, max_model_len: int, block_size: int) -> tuple:
    """(prompt lengths, output lengths, block hashes or None) of bench's n requests: what the simulator needs of
    them, made once (a minute at 256 req/s is 15k prompts of random ids, seconds to draw)."""
    reqs = make_requests(workload, n, seed, vocab, max_model_len, as_arrays=True)
    return ([len(r.prompt_ids) for r in reqs], [r.output_len for r in reqs],
            block_hashes([r.prompt_ids for r in reqs], block_size))
