"""The engine benchmark's time-to-first-token parts: fresh prompts of 1k-8k tokens against their FLOP floor, a 32k
prompt against the linear FLOPs at the matmul rate plus the attention FLOPs at SDPA's, and prompt lengths new to the
engine against the same lengths seen (`python -m pdcli.benchmarks.engine --only ttft,ttftlens,ttft32k`)."""
from __future__ import annotations

import random
import statistics
import time

import torch

from pdcli import LLM, SamplingParams
from pdcli.benchmarks.device import free_gpu
from pdcli.models.arch import ModelArch


def fresh_ttft_ms(llm: LLM, prompt_len: int, rng: random.Random) -> float:
    """TTFT (ms) of one prompt of fresh random tokens (no prefix-cache hit), max_tokens 1."""
    prompt = [rng.randrange(1000, 30000) for _ in range(prompt_len)]
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))
    return (time.perf_counter() - t) * 1e3


def ttft_ms(llm: LLM, prompt_len: int, reps: int = 5) -> float:
    rng = random.Random(prompt_len)
    return statistics.median([fresh_ttft_ms(llm, prompt_len, rng) for _ in range(reps + 1)][1:])


def _ttft_passes(llm: LLM, lengths: list[int], rng: random.Random) -> tuple[list[float], list[float]]:
    """TTFT (ms) of a fresh prompt of each length, then of another fresh prompt of each length again."""
    first = [fresh_ttft_ms(llm, m, rng) for m in lengths]
    return first, [fresh_ttft_ms(llm, m, rng) for m in lengths]


def ttft_new_lengths(llm: LLM, log, n: int = 40) -> dict:
    """TTFT of fresh prompts of n lengths in [64, 2048] the engine has not prefilled before (no multiple of 256),
    each once, then of the same lengths again: a whole prompt's attention shape is new at first (cuDNN builds a
    graph per shape; ops.FRESH_PREFILL_BUCKET rounds lengths up to few shapes), seen the second time. First with
    the rounding off (another n lengths), then as the engine runs. Medians, ms."""
    from pdcli.kernels import ops

    rng = random.Random(2048)
    pool = [x for x in range(64, 2049) if x % 256]
    off, on = (lambda s: (s[:n], s[n:2 * n]))(rng.sample(pool, 2 * n))
    bucket = ops.FRESH_PREFILL_BUCKET
    ops.FRESH_PREFILL_BUCKET = 1
    try:
        off_first, off_again = _ttft_passes(llm, off, rng)
    finally:
        ops.FRESH_PREFILL_BUCKET = bucket
    first, again = _ttft_passes(llm, on, rng)
    res = dict(lengths=on, first_ms=first, again_ms=again, new_ms=statistics.median(first),
               seen_ms=statistics.median(again),
               unbucketed=dict(lengths=off, first_ms=off_first, again_ms=off_again,
                               new_ms=statistics.median(off_first), seen_ms=statistics.median(off_again)))
    log(f"TTFT llama3-8b, {n} prompt lengths of 64-2048 new to the engine: median {res['new_ms']:.1f} ms, the same "
        f"lengths again {res['seen_ms']:.1f} ms; whole prompts attended at their own lengths (another {n}): "
        f"{res['unbucketed']['new_ms']:.1f} ms new, {res['unbucketed']['seen_ms']:.1f} again")
    return res


def gpu_rows(prof, reps: int) -> list[tuple[str, float, int]]:
    """(kernel, ms per rep, calls per rep) from a torch profiler run of reps repetitions, longest first."""
    rows = [(e.key, e.device_time_total / reps / 1e3, e.count // reps) for e in prof.key_averages()
            if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def prefill_breakdown(llm: LLM, prompt_len: int = 2048, reps: int = 3) -> dict:
    """GPU time of one prefill (TTFT request) by kernel, to show where time to first token goes."""
    from torch.profiler import ProfilerActivity, profile

    rng = random.Random(prompt_len + 1)
    prompts = [[rng.randrange(1000, 30000) for _ in range(prompt_len)] for _ in range(reps + 1)]
    llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=1))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for p in prompts[1:]:
            llm.generate([p], SamplingParams(temperature=0, max_tokens=1))
        torch.cuda.synchronize()
    rows = gpu_rows(prof, reps)
    return dict(prompt_len=prompt_len, gpu_ms=sum(r[1] for r in rows),
                kernels=[dict(name=k[:90], ms=ms, calls=c) for k, ms, c in rows[:15]])


def sdpa_causal_flop_s(n: int, hq: int = 32, hk: int = 8, d: int = 128) -> float:
    """PyTorch's causal SDPA rate (bf16, contiguous, cuDNN or flash) on one n-token prompt, FLOP/s."""
    import torch.nn.functional as F

    from pdcli.benchmarks.device import time_us

    gen = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(1, hq, n, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, hk, n, d, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    us = time_us(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), iters=5)
    return 4 * hq * d * n * (n + 1) / 2 / (us * 1e-6)


def ttft_32k(wbytes: int, arch: ModelArch, mm: float, log) -> dict:
    """TTFT of a fresh 32k-token prompt against its floor: the linear FLOPs at the matmul rate plus the attention
    FLOPs at SDPA's rate, both measured in this run."""
    from pdcli.kernels import prefill_choice

    n = 32768
    llm = LLM("dummy:llama3-8b", device="cuda", max_model_len=n + 64)
    ms = ttft_ms(llm, n, reps=3)
    chunks = prefill_choice.chunk_sdpa_row()  # the engine's start timed the aligned chunks' paths
    kernels = prefill_breakdown(llm, n, reps=1)
    del llm
    free_gpu()
    sdpa = sdpa_causal_flop_s(n, arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim)
    linear = 2 * (wbytes / 2 - arch.vocab_size * arch.hidden_size) * n  # the embedding table is gathered
    attn = 4 * arch.num_hidden_layers * arch.num_attention_heads * arch.head_dim * n * (n + 1) / 2
    floor = (linear / mm + attn / sdpa) * 1e3
    log(f"TTFT llama3-8b 32k: {ms:.0f} ms (floor {floor:.0f} ms: linear at {mm / 1e12:.0f}, attention at SDPA's "
        f"{sdpa / 1e12:.0f} TFLOP/s; {ms / floor:.2f}x); later chunks: {chunks.get('choice', 'paged')} ({chunks})")
    log("  32k prefill by kernel (ms): " + ", ".join(f"{k['name'][:60]} {k['ms']:.1f} x{k['calls']}"
                                                     for k in kernels["kernels"]))
    return dict(prompt_len=n, ttft_ms=ms, floor_ms=floor, sdpa_flop_s=sdpa, later_chunks=chunks, breakdown=kernels)


def ttft_rows(llm: LLM, wbytes: int, arch: ModelArch, mm: float, log) -> list[dict]:
    """TTFT of 1k to 8k-token prompts against its floor: the prefill's FLOPs at the matmul rate."""
    rows = []
    for n in (1024, 2048, 4096, 8192):
        ms = ttft_ms(llm, n)
        flops = 2 * wbytes / 2 * n + 4 * arch.num_hidden_layers * arch.num_attention_heads * arch.head_dim * n * n / 2
        rows.append(dict(prompt_len=n, ttft_ms=ms, roofline_ms=flops / mm * 1e3, tflops=flops / ms / 1e9))
        log(f"prefill/TTFT llama3-8b {n}: {ms:.1f} ms (floor {flops / mm * 1e3:.1f} ms)")
    return rows
