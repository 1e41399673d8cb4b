"""Shared CLI pieces: engine options read from the config dataclasses, one-line errors."""
from __future__ import annotations

import sys
from typing import Annotated, NoReturn, Optional

import typer

from pdcli.config import CacheConfig, EngineConfig, SchedulerConfig

EXIT_RUNTIME, EXIT_USAGE = 1, 2  # runtime failure | bad input (flags, model, prompt)

Model = Annotated[str, typer.Option("--model", "-m", help="HF checkpoint dir, .gguf file, dummy:<preset> or smollm2.")]
Device = Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda if available).")]
Dtype = Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16 or float32.")]
MaxModelLen = Annotated[Optional[int], typer.Option(help="Longest prompt + output (default: the model's).")]
MaxNumSeqs = Annotated[int, typer.Option(help="Sequences per step.")]
MaxNumBatchedTokens = Annotated[int, typer.Option(help="Tokens per step (prefill chunks + decodes).")]
BlockSize = Annotated[int, typer.Option(help="Tokens per KV block.")]
NumKvBlocks = Annotated[Optional[int], typer.Option(help="Fixed KV pool size in blocks.")]
GpuMemoryUtilization = Annotated[float, typer.Option(help="Fraction of GPU memory to use.")]
PrefixCaching = Annotated[bool, typer.Option("--enable-prefix-caching/--no-enable-prefix-caching")]


def engine_kwargs(device, dtype, max_model_len, max_num_seqs, max_num_batched_tokens, block_size, num_kv_blocks,
                  gpu_memory_utilization, enable_prefix_caching, seed) -> dict:
    return dict(device=device, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens, block_size=block_size, num_kv_blocks=num_kv_blocks,
                gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching, seed=seed)


DEFAULTS = dict(model=EngineConfig.model, dtype=EngineConfig.dtype, max_num_seqs=SchedulerConfig.max_num_seqs,
                max_num_batched_tokens=SchedulerConfig.max_num_batched_tokens, block_size=CacheConfig.block_size,
                gpu_memory_utilization=CacheConfig.gpu_memory_utilization,
                enable_prefix_caching=CacheConfig.enable_prefix_caching)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    message = " ".join(str(message).split())  # one line
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)
