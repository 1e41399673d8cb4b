"""Shared CLI pieces: engine options read from the config dataclasses, one-line errors."""
from __future__ import annotations

import functools
import inspect
import sys
import typing
from typing import Annotated, NoReturn, Optional

import typer

from pdcli.config import CacheConfig, EngineConfig, SchedulerConfig

fast_exit = False  # set by a command whose process holds nothing to tear down: `run` ends it with os._exit

EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130  # runtime failure | bad input (flags, model, prompt) | Ctrl-C

Model = Annotated[str, typer.Option("--model", "-m", help="HF checkpoint dir, .gguf file, dummy:<preset> or smollm2.")]
Device = Annotated[Optional[str], typer.Option("--device", "--devices",
                                               help="cpu, cuda or cuda:N (default: cuda if available).")]
Devices = Annotated[Optional[str], typer.Option("--devices", "--device", help=(
    "Devices, e.g. cuda:0,cuda:1 or cpu,cpu (default: every visible GPU, else cpu,cpu)."))]
Dtype = Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16 or float32.")]
MaxModelLen = Annotated[Optional[int], typer.Option(help="Longest prompt + output (default: the model's).")]
MaxNumSeqs = Annotated[int, typer.Option(help="Sequences per step.")]
MaxNumBatchedTokens = Annotated[int, typer.Option(help="Tokens per step (prefill chunks + decodes).")]
BlockSize = Annotated[int, typer.Option(help="Tokens per KV block.")]
NumKvBlocks = Annotated[Optional[int], typer.Option(help="Fixed KV pool size in blocks.")]
GpuMemoryUtilization = Annotated[float, typer.Option(help="Fraction of GPU memory to use.")]
PrefixCaching = Annotated[bool, typer.Option("--enable-prefix-caching/--no-enable-prefix-caching")]
AdmissionReserve = Annotated[float, typer.Option(
    help="Admit new sequences only while free KV also covers this fraction of running ones' remaining "
         "max_tokens (learned from finished ones); 0: admit greedily, preempt when full.")]
TensorParallelSize = Annotated[int, typer.Option(
    "--tensor-parallel-size", "-tp", min=1,
    help="Devices per engine (tensor parallelism): each worker takes that many consecutive devices of its list, "
         "or a `+` group (cuda:0+cuda:1).")]
Mps = Annotated[Optional[bool], typer.Option(
    "--mps/--no-mps", help="Run workers that share a GPU under CUDA MPS, so their kernels overlap "
                           "(default: when MPS can start; else they are time-sliced).")]
AsyncScheduling = Annotated[Optional[bool], typer.Option(
    "--async-scheduling/--no-async-scheduling",
    help="Schedule step i + 1 while the device runs step i (default: on GPUs only).")]


# the engine flags every command shares: (name, annotation, default from the config dataclasses)
DEFAULT_MODEL = EngineConfig.model
ENGINE_OPTIONS = (
    ("dtype", Dtype, EngineConfig.dtype),
    ("max_model_len", MaxModelLen, SchedulerConfig.max_model_len),
    ("max_num_seqs", MaxNumSeqs, SchedulerConfig.max_num_seqs),
    ("max_num_batched_tokens", MaxNumBatchedTokens, SchedulerConfig.max_num_batched_tokens),
    ("block_size", BlockSize, CacheConfig.block_size),
    ("num_kv_blocks", NumKvBlocks, CacheConfig.num_kv_blocks),
    ("gpu_memory_utilization", GpuMemoryUtilization, CacheConfig.gpu_memory_utilization),
    ("enable_prefix_caching", PrefixCaching, CacheConfig.enable_prefix_caching),
    ("admission_reserve", AdmissionReserve, SchedulerConfig.admission_reserve),
    ("async_scheduling", AsyncScheduling, EngineConfig.async_scheduling),
    ("tensor_parallel_size", TensorParallelSize, EngineConfig.tensor_parallel_size),
)


def engine_options(fn):
    """Add the shared engine flags to a command; the command receives them as one dict, `engine`."""
    hints = typing.get_type_hints(fn, include_extras=True)  # the command module's annotations, evaluated
    params = [p.replace(annotation=hints.get(p.name, p.annotation), kind=inspect.Parameter.KEYWORD_ONLY)
              for p in inspect.signature(fn).parameters.values() if p.name != "engine"]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann)
               for name, ann, default in ENGINE_OPTIONS]

    @functools.wraps(fn)
    def command(**kwargs):
        return fn(engine={name: kwargs.pop(name) for name, _, _ in ENGINE_OPTIONS}, **kwargs)

    del command.__wrapped__
    command.__signature__ = inspect.Signature(params, return_annotation=None)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    message = " ".join(str(message).split())  # one line
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)
