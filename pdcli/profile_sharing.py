"""How much a neighbour slows this worker's steps when two workers share one device (under MPS on a GPU, as
`pdcli serve` runs them): a decode step and a prefill step timed alone, then beside a second process that
decodes without pause, then both beside it prefilling without pause. The router and the planner
price GPU neighbours with these factors (CostModel.sharing) instead of constants and of time-slicing (a decode
waiting for a neighbour's whole prefill).

Both processes are fresh (an MPS client must start after its daemon); each holds a KV pool just large
enough for its batch."""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
from dataclasses import dataclass

logger = logging.getLogger("pdcli.profile")


@dataclass(frozen=True)
class SharingShapes:
    batch: int = 32  # decode batch of the measured worker and of its neighbour
    ctx: int = 512  # their tokens per sequence
    prompt: int = 1024  # the measured prefill step
    reps: int = 10
    block_size: int = 16

    def kv_blocks(self) -> int:
        return (self.batch * -(-self.ctx // self.block_size) + -(-self.prompt // self.block_size)) + 8


def _engine(model: str, device: str, engine_kwargs: dict, shapes: SharingShapes, env: dict):
    os.environ.update(env)
    import torch

    from pdcli.config import EngineConfig
    from pdcli.engine.llm_engine import LLMEngine

    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # the two processes split the cores
    kw = {k: v for k, v in engine_kwargs.items() if k not in ("num_kv_blocks", "block_size", "device")}
    return LLMEngine(EngineConfig.from_kwargs(model, device=device, num_kv_blocks=shapes.kv_blocks(),
                                              block_size=shapes.block_size, **kw))


IDLE, DECODING, PREFILLING = 0, 1, 2  # the neighbour's mode


def _neighbour(model, device, engine_kwargs, shapes, env, ready, stop, mode) -> None:
    """Steps without pause in the mode asked (a full decode batch, or prefills of a prompt) until `stop`."""
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from pdcli.engine.scheduler import SchedulerOutput
    from pdcli.profiler import StepTimer

    engine = _engine(model, device, engine_kwargs, shapes, env)
    timer = StepTimer(engine, seed=1)
    seqs = [timer.prepared(shapes.ctx, shapes.ctx - 1) for _ in range(shapes.batch)]
    prompt = timer.prepared(shapes.prompt, 0)
    steps = {DECODING: SchedulerOutput(seqs, [1] * len(seqs)), PREFILLING: SchedulerOutput([prompt], [shapes.prompt])}
    for out in steps.values():
        engine.runner.execute(out)
    ready.set()
    while not stop.is_set():
        out = steps.get(mode.value)
        if out is None:
            time.sleep(0.001)
        else:
            engine.runner.execute(out)


def _measured(model, device, engine_kwargs, shapes, env, ready, mode, stop, results) -> None:
    """Decode and prefill step times alone, beside the neighbour decoding, and beside it prefilling."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from pdcli.profiler import StepTimer

    try:
        timer = StepTimer(_engine(model, device, engine_kwargs, shapes, env))
        ready.wait()  # the neighbour is loaded, and idle

        def both() -> tuple[float, float]:
            return (timer.decode_ms(shapes.batch, shapes.ctx, shapes.reps),
                    timer.prefill_ms(shapes.prompt, 0, shapes.reps))

        alone = both()
        mode.value = DECODING
        beside = both()
        mode.value = PREFILLING
        beside_prefill = both()
        stop.set()
        results.put(dict(decode_alone_ms=alone[0], prefill_alone_ms=alone[1], decode_beside_ms=beside[0],
                         prefill_beside_ms=beside[1], decode_beside_prefill_ms=beside_prefill[0],
                         prefill_beside_prefill_ms=beside_prefill[1]))
    except Exception as err:  # noqa: BLE001 (reported by the parent)
        stop.set()
        results.put(dict(error=f"{type(err).__name__}: {err}"))


def profile_sharing(model: str, device: str, engine_kwargs: dict, shapes: SharingShapes = SharingShapes(),
                    mps: bool | None = None, timeout_s: float = 600.0) -> dict:
    """{decode_beside_decode, prefill_beside_decode: step time beside a decoding neighbour over alone;
    decode_beside_prefill, prefill_beside_prefill: beside a prefilling one; plus the times and shapes};
    RuntimeError if the processes fail."""
    from pdcli.workers.layout import WorkerSpec
    from pdcli.workers.mps import start_for

    daemon = start_for([WorkerSpec(0, "collocated", device), WorkerSpec(1, "collocated", device)], mps) \
        if device.startswith("cuda") else None
    env = daemon.env if daemon else {}
    ctx = mp.get_context("spawn")
    ready, stop, results, mode = ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Value("i", IDLE)
    if device.startswith("cuda"):  # two engines on one GPU: each its share of the memory
        from pdcli.config import CacheConfig

        util = engine_kwargs.get("gpu_memory_utilization") or CacheConfig.gpu_memory_utilization
        engine_kwargs = dict(engine_kwargs, gpu_memory_utilization=util / 2)
    args = (model, device, engine_kwargs, shapes, env)
    procs = [ctx.Process(target=_neighbour, args=(*args, ready, stop, mode), daemon=True, name="pdcli-neighbour"),
             ctx.Process(target=_measured, args=(*args, ready, mode, stop, results), daemon=True,
                         name="pdcli-measured")]
    try:
        for p in procs:
            p.start()
        try:
            got = results.get(timeout=timeout_s)
        except Exception:  # queue.Empty, or a process that died
            raise RuntimeError(f"the GPU-sharing measurement did not finish in {timeout_s:.0f} s") from None
        if "error" in got:
            raise RuntimeError(f"the GPU-sharing measurement failed: {got['error']}")
    finally:
        stop.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        if daemon is not None:
            daemon.stop()
    return dict(got, decode_beside_decode=got["decode_beside_ms"] / got["decode_alone_ms"],
                prefill_beside_decode=got["prefill_beside_ms"] / got["prefill_alone_ms"],
                decode_beside_prefill=got["decode_beside_prefill_ms"] / got["decode_alone_ms"],
                prefill_beside_prefill=got["prefill_beside_prefill_ms"] / got["prefill_alone_ms"], mps=daemon is not None,
                batch=shapes.batch, ctx=shapes.ctx, prompt=shapes.prompt)
