"""Frozen config dataclasses: the one source of defaults for the engine and the CLI."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 64  # tokens per KV block
    gpu_memory_utilization: float = 0.9  # fraction of GPU memory the engine may use in all
    num_kv_blocks: int | None = None  # fixed pool size; overrides the memory-based sizing
    cpu_kv_cache_gib: float = 0.5  # KV pool bound on CPU
    enable_prefix_caching: bool = True

    def __post_init__(self):
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # sequences in one step
    max_num_batched_tokens: int = 8192  # tokens (prefill chunks + decodes) in one step
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    # Admit a waiting sequence only while the free KV blocks also cover this fraction of every running
    # sequence's remaining max_tokens (then learned from finished sequences); 0: admit greedily and
    # preempt (recompute) when the pool runs out, as vLLM does.
    admission_reserve: float = 1.0

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if not 0.0 <= self.admission_reserve <= 1.0:
            raise ValueError(f"admission_reserve must be in [0, 1], got {self.admission_reserve}")


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2"  # HF dir, .gguf file, dummy:<preset> or smollm2
    device: str | None = None  # None: cuda if available else cpu
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    seed: int = 0  # seed for dummy weights and unseeded sampling
    enforce_eager: bool = False  # no CUDA graphs
    # schedule step i + 1 while the device runs step i; None: on a GPU only (on the CPU the host runs the step
    # itself, so nothing overlaps and a finishing sequence's next step is wasted)
    async_scheduling: bool | None = None
    # one engine over this many devices (vLLM's name): rank 0 here, ranks 1.. in follower processes; devices:
    # tp_devices, else `device` for each rank on a CPU, consecutive GPUs from `device` on CUDA
    tensor_parallel_size: int = 1
    tp_devices: tuple[str, ...] | None = None
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> "EngineConfig":
        """Split flat vLLM-style keyword options over the component configs."""
        parts = {}
        for name, sub in (("cache", CacheConfig), ("scheduler", SchedulerConfig)):
            names = {f.name for f in fields(sub)}
            parts[name] = sub(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        unknown = set(kwargs) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
        return cls(model=model, **kwargs, **parts)
