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

from pdcli.config import CacheConfig

logger = logging.getLogger("pdcli.profile")


@dataclass(frozen=True)
class SharingShapes:
    batch: int = 32  # decode batch of the measured worker and of its neighbour
    ctx: int = 512  # their tokens per sequence
    prompt: int = 1024  # the measured prefill step
    reps: int = 10
    block_size: int = CacheConfig.block_size  # the engine's
    # prompts of unequal lengths: each own prompt timed beside the neighbour's decode batch and beside it prefilling
    # each neighbour prompt (a short prompt's steps beside a long one's are not priced by the equal-length factor)
    grid_own: tuple = (256, 1024, 4096)
    # the neighbour's prompts: 256 for bimodal's short ones (one H100, 1P1D on bimodal: short requests' TPOT 1.01-1.06x
    # simulated whatever ran beside them, where the 1024-token point's share is held for 256-token neighbours;
    # results/router/sim_residuals_nvidia-h100-80gb-hbm3_disaggregated.json)
    grid_neighbour: tuple = (256, 1024, 8192)
    # more decode batches of the neighbour for the own prompts of the grid: is a prompt's share of a decode step
    # keyed by their ratio alone? (served 256-token prompts on a prefill worker: 1.09-1.21x their simulated TTFT,
    # results/router/sim_residuals_ttft_nvidia-h100-80gb-hbm3.json)
    grid_decode_batch: tuple = (4, 128)

    def within(self, limit: int) -> "SharingShapes":
        """The same without the grid's lengths past limit (an engine's longest prompt or token budget)."""
        from dataclasses import replace

        return replace(self, grid_own=tuple(n for n in self.grid_own if n <= limit),
                       grid_neighbour=tuple(n for n in self.grid_neighbour if n <= limit))

    def prompt_lens(self) -> tuple:
        return tuple(sorted({self.prompt, *self.grid_own, *self.grid_neighbour}))

    def decode_batches(self) -> tuple:
        return tuple(sorted({self.batch, *self.grid_decode_batch}))

    def kv_blocks(self) -> int:  # the largest decode batch and one prepared prompt of each length, held together
        return max(self.decode_batches()) * -(-self.ctx // self.block_size) + \
            sum(-(-n // self.block_size) for n in self.prompt_lens()) + 8


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


def _longest(engine) -> int:
    """The longest prompt one step of this engine prefills (tokens)."""
    return min(engine.max_model_len, engine.config.scheduler.max_num_batched_tokens)


IDLE, DECODING, PREFILLING = 0, 1, 2  # the neighbour's mode


def _neighbour(model, device, engine_kwargs, shapes, env, ready, stop, mode, size) -> None:
    """Steps without pause in the mode asked (a decode batch of `size` sequences, or prefills of a prompt of `size`
    tokens) until `stop`."""
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from pdcli.engine.scheduler import SchedulerOutput
    from pdcli.profiler import StepTimer

    engine = _engine(model, device, engine_kwargs, shapes, env)
    shapes = shapes.within(_longest(engine))
    timer = StepTimer(engine, seed=1)
    seqs = [timer.prepared(shapes.ctx, shapes.ctx - 1) for _ in range(max(shapes.decode_batches()))]
    steps = {(DECODING, b): SchedulerOutput(seqs[:b], [1] * b) for b in shapes.decode_batches()}
    for n in shapes.prompt_lens():
        steps[(PREFILLING, n)] = SchedulerOutput([timer.prepared(n, 0)], [n])
    for out in steps.values():
        engine.runner.execute(out)
    ready.set()
    while not stop.is_set():
        out = steps.get((mode.value, size.value))
        if out is None:
            time.sleep(0.001)
        else:
            engine.runner.execute(out)


def _measured(model, device, engine_kwargs, shapes, env, ready, mode, size, stop, results) -> None:
    """Decode and prefill step times alone, beside the neighbour decoding, and beside it prefilling; prompts of
    the grid's own lengths beside the neighbour decoding (each of its decode batches), and beside it prefilling the
    grid's neighbour lengths."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from pdcli.profiler import StepTimer

    try:
        engine = _engine(model, device, engine_kwargs, shapes, env)
        shapes = shapes.within(_longest(engine))
        timer = StepTimer(engine)
        ready.wait()  # the neighbour is loaded, and idle

        def both() -> tuple[float, float]:
            return (timer.decode_ms(shapes.batch, shapes.ctx, shapes.reps),
                    timer.prefill_ms(shapes.prompt, 0, shapes.reps))

        alone = both()
        lens = sorted({*shapes.grid_own, *shapes.grid_neighbour})
        prompt_alone = {n: timer.prefill_ms(n, 0, shapes.reps) for n in lens}
        # the neighbour's decode steps have the shapes of ours: their times alone are ours alone
        decode_alone = {b: alone[0] if b == shapes.batch else timer.decode_ms(b, shapes.ctx, shapes.reps)
                        for b in shapes.decode_batches()}
        size.value = shapes.batch
        mode.value = DECODING
        beside = both()
        decode_grid = []
        for b in (shapes.batch, *[b for b in shapes.decode_batches() if b != shapes.batch]):
            size.value = b
            decode_grid += [dict(own=own, neighbour=0, neighbour_batch=b, own_alone_ms=prompt_alone[own],
                                 own_beside_ms=timer.prefill_ms(own, 0, shapes.reps), neighbour_ms=decode_alone[b])
                            for own in shapes.grid_own]
        size.value = shapes.prompt
        mode.value = PREFILLING
        beside_prefill = both()
        grid = []
        for nb in shapes.grid_neighbour:
            size.value = nb
            decode_ms = timer.decode_ms(shapes.batch, shapes.ctx, shapes.reps)
            grid.append(dict(own=0, neighbour=nb, own_alone_ms=alone[0], own_beside_ms=decode_ms,
                             neighbour_ms=prompt_alone[nb]))
            for own in shapes.grid_own:
                grid.append(dict(own=own, neighbour=nb, own_alone_ms=prompt_alone[own],
                                 own_beside_ms=timer.prefill_ms(own, 0, shapes.reps), neighbour_ms=prompt_alone[nb]))
        stop.set()
        results.put(dict(decode_alone_ms=alone[0], prefill_alone_ms=alone[1], decode_beside_ms=beside[0],
                         prefill_beside_ms=beside[1], decode_beside_prefill_ms=beside_prefill[0],
                         prefill_beside_prefill_ms=beside_prefill[1], beside_prefill_grid=grid,
                         beside_decode_grid=decode_grid))
    except Exception as err:  # noqa: BLE001 (reported by the parent)
        stop.set()
        results.put(dict(error=f"{type(err).__name__}: {err}"))


def profile_sharing(model: str, device: str, engine_kwargs: dict, shapes: SharingShapes = SharingShapes(),
                    mps: bool | None = None, timeout_s: float = 600.0) -> dict:
    """{decode_beside_decode, prefill_beside_decode: step time beside a decoding neighbour over alone;
    decode_beside_prefill, prefill_beside_prefill: beside a prefilling one; beside_prefill_grid: [{own (prompt
    tokens, 0 for the decode batch), neighbour (its prompt tokens), own_alone_ms, own_beside_ms, neighbour_ms}];
    beside_decode_grid: the same for own prompts beside the neighbour's decode batch (neighbour 0, neighbour_batch
    its sequences);
    plus the times and shapes};
    RuntimeError if the processes fail."""
    from pdcli.workers.layout import WorkerSpec
    from pdcli.workers.mps import start_for

    daemon = start_for([WorkerSpec(0, "collocated", device), WorkerSpec(1, "collocated", device)], mps) \
        if device.startswith("cuda") else None
    env = daemon.env if daemon else {}
    ctx = mp.get_context("spawn")
    ready, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    mode, size = ctx.Value("i", IDLE), ctx.Value("i", shapes.prompt)
    if device.startswith("cuda"):  # two engines on one GPU: each its share of the memory
        from pdcli.config import CacheConfig

        util = engine_kwargs.get("gpu_memory_utilization") or CacheConfig.gpu_memory_utilization
        engine_kwargs = dict(engine_kwargs, gpu_memory_utilization=util / 2)
    args = (model, device, engine_kwargs, shapes, env)
    procs = [ctx.Process(target=_neighbour, args=(*args, ready, stop, mode, size), daemon=True,
                         name="pdcli-neighbour"),
             ctx.Process(target=_measured, args=(*args, ready, mode, size, stop, results), daemon=True,
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
