"""Tensor parallelism's follower ranks: processes that hold their shard of the model and its KV heads and run
each step's forward pass as rank 0 tells them (nano-vllm's design). Rank 0 keeps the scheduler, the block
manager and every channel to the outside; it sends each step's host-side inputs (`TPStep`) before running
the same forward itself. Only rank 0 samples: it broadcasts the step's tokens over the TP group (in stream
order, after the logits' all-gather), and a follower patches them into the next step's input ids where rank 0
had not yet landed them (async scheduling), as rank 0 does. A follower that dies makes rank 0's next
collective fail (gloo at once; NCCL after the group's timeout), so its engine's requests end with errors."""
from __future__ import annotations

import logging
import multiprocessing as mp
import signal
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger("pdcli.engine")


@dataclass(frozen=True, slots=True)
class TPStep:
    """One eager forward pass: block copies first, then the rows of the flat batch."""
    block_copies: list[tuple[int, int]]
    input_ids: np.ndarray  # [num_tokens] int64
    block_tables: list[list[int]]
    starts: list[int]
    lens: list[int]
    logits_indices: list[int]
    logits: bool  # compute the logits (their all-gather is a collective)
    layer_sends: list | None = None  # a prefill worker's layer-wise KV sends in this pass (distributed/tp_kv.py)
    graph: bool = False  # a decode-only batch replayed from its captured CUDA graph
    pending: tuple = ([], [])  # (rows of input_ids, rows of the last step's tokens): tokens not yet on the host
    num_sampled: int = 0  # tokens rank 0 samples in this step and broadcasts after it


@dataclass(frozen=True, slots=True)
class TPStop:
    pass


def tp_devices(device: str, size: int, given: tuple[str, ...] | None) -> list[str]:
    if given:
        if len(given) != size:
            raise ValueError(f"{len(given)} devices for tensor_parallel_size {size}")
        return list(given)
    if device.startswith("cuda"):
        first = int(device.split(":")[1]) if ":" in device else 0
        return [f"cuda:{first + i}" for i in range(size)]
    return [device] * size


def start_followers(config, devices: list[str], store_port: int, log_level: int) -> list[tuple[mp.Process, object]]:
    """Ranks 1.. of a TP group, each on its device: (process, pipe to it)."""
    ctx = mp.get_context("spawn")
    out = []
    for rank in range(1, len(devices)):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=follower_main, daemon=True, name=f"pdcli-tp-{rank}",
                           args=(config, rank, devices[rank], store_port, child, log_level))
        proc.start()
        child.close()
        out.append((proc, parent))
    return out


def follower_main(config, rank: int, device: str, store_port: int, conn, log_level: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0's process stops it
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from pdcli.logger import init_logging

    init_logging(logging.getLevelName(log_level).lower(), f" [tp {rank} {device}]")
    from pdcli.distributed.tp_kv import FollowerKV
    from pdcli.engine.llm_engine import build_runner

    try:
        runner = build_runner(config, rank, device, store_port)
        kv = FollowerKV(runner, rank)
        while True:
            msg = conn.recv()
            if isinstance(msg, TPStop):
                return
            if isinstance(msg, TPStep):
                runner.follow(msg, kv)
            else:
                kv.handle(msg)
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass
    except Exception:
        logger.exception("tensor-parallel rank %d failed", rank)
        raise
