"""Engine benchmark on the GPU: decode step time, prefill time / TTFT, offline throughput, each against its
roofline, plus transformers' own generate on the same model. Writes results/engine_<device>.json.

    python -m pdcli.benchmarks.engine [--out results] [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time

import torch

from pdcli import LLM, SamplingParams
from pdcli.benchmarks.roofline import (decode_step_ops, offline_bound_tok_s, offline_run_bound_tok_s,
                                       offline_serial_bound_tok_s, roofline_ms)
from pdcli.benchmarks.results import provenance, write
from pdcli.benchmarks.device import copy_bandwidth, device_slug, free_gpu, matmul_rate
from pdcli.benchmarks.engine_ttft import gpu_rows, prefill_breakdown, ttft_32k, ttft_new_lengths, ttft_rows
from pdcli.models.arch import ModelArch
from pdcli.models.presets import PRESETS


def weight_bytes(preset: str) -> int:
    return ModelArch.from_hf_config(PRESETS[preset]).num_params() * 2


@contextlib.contextmanager
def decoding(llm: LLM, batch: int, prompt_len: int, max_tokens: int, warmup_steps: int):
    """`batch` sequences past their prompts and `warmup_steps` decode steps into their outputs, each with room for
    max_tokens more (past what it decodes while later prompts are still prefilling, chunked); drained and popped
    on exit."""
    eng = llm.engine
    prefill_steps = -(-batch * prompt_len // eng.config.scheduler.max_num_batched_tokens) + 1
    p = SamplingParams(temperature=0, max_tokens=max_tokens + warmup_steps + prefill_steps, ignore_eos=True)
    rng = random.Random(batch)
    hi = min(30000, eng.arch.vocab_size)  # token ids 1000-30000 (a tiny test vocabulary: its upper half)
    lo = min(1000, hi // 2)
    ids = [eng.add_request([rng.randrange(lo, hi) for _ in range(prompt_len)], p) for _ in range(batch)]
    while eng.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.scheduler.running):
        eng.step()
    for _ in range(warmup_steps):
        eng.step()
    assert len(eng.scheduler.running) == batch
    try:
        yield eng
    finally:
        while eng.has_unfinished_requests():
            eng.step()
        for rid in ids:
            eng.pop_finished(rid)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode_steps(llm: LLM, batch: int, prompt_len: int, steps: int) -> float:
    """Decode step time (ms) with `batch` running sequences, in steady state: the wall time of `steps`
    back-to-back engine steps (async scheduling overlaps the host's work with the device's), divided."""
    with decoding(llm, batch, prompt_len, steps + 8, warmup_steps=2) as eng:
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            eng.step()
        sync()
        ms = (time.perf_counter() - t) / steps * 1e3
        assert len(eng.scheduler.running) == batch, "a sequence ended inside the timed steps"
        return ms


def kernel_breakdown(llm: LLM, batch: int, prompt_len: int = 256, steps: int = 5) -> dict:
    """GPU time per decode step by kernel (torch profiler), to show where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    with decoding(llm, batch, prompt_len, steps + 8, warmup_steps=2) as eng:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                eng.step()
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / steps * 1e3
    rows = gpu_rows(prof, steps)
    gpu = sum(r[1] for r in rows)
    return dict(batch=batch, wall_ms=wall, gpu_ms=gpu,
                kernels=[dict(name=k[:90], ms_per_step=ms, calls_per_step=c) for k, ms, c in rows[:15]])


def hf_decode_ms(preset: str, prompt_len: int = 256, new_tokens: int = 64) -> float:
    """transformers' own generate (bf16, sdpa, random weights in the same shapes), ms per new token at batch 1."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type={"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}[
        PRESETS[preset]["architectures"][0]], **{k: v for k, v in PRESETS[preset].items() if k != "architectures"})
    cfg.dtype = torch.bfloat16
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    finally:
        torch.set_default_dtype(prev)
    ids = torch.randint(1000, 30000, (1, prompt_len), device="cuda")
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        model.generate(ids, **kw)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
    del model
    free_gpu()
    return ((t2 - t1) - (t1 - t0)) / (new_tokens - 1) * 1e3


def offline(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> dict:
    """Throughput of one generate call, with where the host's time went: preparing and launching steps,
    blocked waiting for the device's tokens, and everything else (scheduling, bookkeeping)."""
    from pdcli.engine.model_runner import StepFuture

    runner = llm.engine.runner
    timing = dict(decode_steps=0, mixed_steps=0, launch_s=0.0, wait_s=0.0)
    launch, result = runner.launch, StepFuture.result

    def timed_launch(out):
        t0 = time.perf_counter()
        try:
            return launch(out)
        finally:
            timing["decode_steps" if out.is_decode_only else "mixed_steps"] += 1
            timing["launch_s"] += time.perf_counter() - t0

    def timed_result(fut):
        t0 = time.perf_counter()
        try:
            return result(fut)
        finally:
            timing["wait_s"] += time.perf_counter() - t0

    runner.launch, StepFuture.result = timed_launch, timed_result
    try:
        torch.cuda.synchronize()
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
    finally:
        del runner.launch
        StepFuture.result = result
    n_out = sum(len(o.token_ids) for o in outs)
    timing["other_s"] = dt - timing["launch_s"] - timing["wait_s"]
    return dict(num_prompts=len(prompts), output_tokens=n_out, input_tokens=sum(map(len, prompts)), seconds=dt,
                output_tok_s=n_out / dt, preemptions=llm.engine.scheduler.num_preemptions, timing=timing)


def run_offline(which: str, quick: bool, log, bw: float | None = None, mm: float | None = None,
                engine_kw: dict | None = None) -> dict:
    """offline: dummy:qwen3-8b, 512 prompts of 1024 tokens -> 1024 each; nanovllm: nano-vllm's protocol
    (dummy:qwen3-0.6b, 256 prompts, input and output lengths uniform in [100, 1024], seed 0). engine_kw: engine
    settings of an experiment on the qwen3-8b run (--only offline), over max_num_seqs=256."""
    if which == "offline":
        kw = dict(dict(max_num_seqs=256), **(engine_kw or {}))
        llm = LLM("dummy:qwen3-8b", device="cuda", max_model_len=2048 + 16, **kw)
        n = 64 if quick else 512
        rng = random.Random(0)
        prompts = [[rng.randrange(1000, 100000) for _ in range(1024)] for _ in range(n)]
        res = offline(llm, prompts, SamplingParams(temperature=0, max_tokens=1024, ignore_eos=True))
        if bw and mm:
            e = llm.engine
            pool = e.runner.num_blocks * e.config.cache.block_size
            res["bound_tok_s"], res["bound_batch"] = offline_bound_tok_s(e.arch, n, 1024, 1024, pool, bw, mm,
                                                                         max_num_seqs=kw["max_num_seqs"])
            res["run_bound_tok_s"] = offline_run_bound_tok_s(e.arch, n, 1024, 1024, pool, bw, mm, kw["max_num_seqs"])
            res["serial_bound_tok_s"] = offline_serial_bound_tok_s(e.arch, n, 1024, 1024, bw, mm, kw["max_num_seqs"])
        res["engine"] = kw
        log(f"offline qwen3-8b {n}x1024->1024 {kw}: {res['output_tok_s']:.0f} out tok/s ({res['seconds']:.1f} s; "
            f"{res['preemptions']} preemptions; decode "
            f"bound {res.get('bound_tok_s', float('nan')):.0f} at batch {res.get('bound_batch')}, whole-run bound "
            f"{res.get('run_bound_tok_s', float('nan')):.0f}, any serial schedule "
            f"{res.get('serial_bound_tok_s', float('nan')):.0f}) {res['timing']}")
    else:
        llm = LLM("dummy:qwen3-0.6b", device="cuda", max_model_len=4096, max_num_seqs=256)
        random.seed(0)
        n = 64 if quick else 256
        lens_in = [random.randint(100, 1024) for _ in range(n)]
        lens_out = [random.randint(100, 1024) for _ in range(n)]
        prompts = [[random.randint(0, 10000) for _ in range(li)] for li in lens_in]
        res = offline(llm, prompts, [SamplingParams(temperature=0.6, max_tokens=lo, ignore_eos=True) for lo in lens_out])
        log(f"offline nano-vllm protocol qwen3-0.6b: {res['output_tok_s']:.0f} out tok/s ({res['seconds']:.1f} s)")
    del llm
    free_gpu()
    return res


PARTS = ("hf", "decode", "breakdown", "ttft", "ttftlens", "ttft32k", "offline", "nanovllm")


def parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results")
    ap.add_argument("--quick", action="store_true", help="smaller offline runs (for a smoke test)")
    ap.add_argument("--only", default=None, help="comma list of parts to run, written to engine_parts_<device>.json: "
                                                  "hf, decode, breakdown, ttft, ttftlens, ttft32k, offline, nanovllm")
    ap.add_argument("--admission-reserve", type=float, default=None,
                    help="with --only offline: the qwen3-8b run's admission_reserve (an experiment; default the engine's)")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="with --only offline: its max_num_seqs (default 256)")
    return ap.parse_args(argv)


def decode_rows(llm: LLM, wbytes: int, arch: ModelArch, bw: float, mm: float, log) -> list[dict]:
    """Decode step time at batch 1 to 256 (context 256) against its floors: weights and KV read at copy
    bandwidth (roofline_ms), and the per-op roofline (op_roofline_ms: each op's max of bytes / bandwidth and
    FLOPs / matmul rate, summed; benchmarks/roofline.py)."""
    rows = []
    kv_tok = arch.kv_bytes_per_token * 2
    for b in (1, 8, 64, 256):
        ms = decode_steps(llm, b, 256, 24)
        floor = (wbytes + b * 270 * kv_tok) / bw * 1e3
        op_floor = roofline_ms(decode_step_ops(arch, b, 270), bw, mm)
        rows.append(dict(batch=b, context=256, step_ms=ms, roofline_ms=floor, op_roofline_ms=op_floor,
                         out_tok_s=b / ms * 1e3))
        log(f"decode llama3-8b bs{b}: {ms:.2f} ms/step (bytes floor {floor:.2f} ms, per-op roofline {op_floor:.2f} ms,"
            f" {ms / op_floor:.2f}x)")
    return rows


def breakdowns(llm: LLM, log) -> tuple[list[dict], dict]:
    """GPU time by kernel of a decode step at batch 1, 64 and 256, and of one prefill."""
    breakdown = [kernel_breakdown(llm, b) for b in (1, 64, 256)]
    for bd in breakdown:  # decode steps
        log(f"bs{bd['batch']}: wall {bd['wall_ms']:.2f} ms/step, GPU {bd['gpu_ms']:.2f} ms; top: " +
            ", ".join(f"{k['name'][:40]} {k['ms_per_step']:.2f}" for k in bd["kernels"][:6]))
    pb = prefill_breakdown(llm)
    if pb:
        log(f"prefill {pb['prompt_len']}: GPU {pb['gpu_ms']:.2f} ms; " +
            ", ".join(f"{k['name'][:50]} {k['ms']:.2f} ({k['calls']})" for k in pb["kernels"][:12]))
    return breakdown, pb


def bench_llama3_8b(parts: set[str], bw: float, mm: float, log) -> dict:
    """The decode, breakdown and ttft parts on dummy:llama3-8b (the LLM freed after): kernel_path, decode,
    breakdown, prefill_breakdown and prefill."""
    llm = LLM("dummy:llama3-8b", device="cuda", max_model_len=8192 + 64) if parts & {"decode", "breakdown", "ttft", "ttftlens"} \
        else None
    wbytes = weight_bytes("llama3-8b")
    arch = ModelArch.from_hf_config(PRESETS["llama3-8b"])
    out = dict(kernel_path=llm.engine.runner.kernel_path if llm else None)
    out["decode"] = decode_rows(llm, wbytes, arch, bw, mm, log) if "decode" in parts else []
    out["breakdown"], out["prefill_breakdown"] = breakdowns(llm, log) if "breakdown" in parts else ([], None)
    out["prefill"] = ttft_rows(llm, wbytes, arch, mm, log) if "ttft" in parts else []
    out["ttft_new_lengths"] = ttft_new_lengths(llm, log) if "ttftlens" in parts else None
    del llm
    free_gpu()
    out["ttft_32k"] = ttft_32k(wbytes, arch, mm, log) if "ttft32k" in parts else None
    return out



def prefill_attn_kernel() -> str:
    """The paged prefill attention the engine runs here for the 32k prompt's chunks (ops.prefill_kernel_name)."""
    from pdcli.kernels import build, prefill_choice
    from pdcli.kernels.ops import prefill_kernel_name

    mod = build.get()
    if mod and prefill_choice.chunk_sdpa_on():
        return "chunk_sdpa"  # the chunks after the first start at multiples of 8,192 tokens (kernels/chunk_sdpa.py)
    return prefill_kernel_name(mod, 128, 8192) if mod else "mma"


def main(argv=None) -> int:
    args = parse_args(argv)
    parts = set(args.only.split(",")) if args.only else set(PARTS)
    if parts - set(PARTS):
        print(f"error: unknown --only part(s) {', '.join(sorted(parts - set(PARTS)))}; use {', '.join(sorted(PARTS))}",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: the engine benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    bw, mm = copy_bandwidth(), matmul_rate()
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    hf_ms = None
    if "hf" in parts:
        hf_ms = hf_decode_ms("llama3-8b")
        log(f"transformers generate llama3-8b bs1: {hf_ms:.2f} ms/token")
    llama = bench_llama3_8b(parts, bw, mm, log)
    if args.only:
        kw = {k: v for k, v in (("admission_reserve", args.admission_reserve), ("max_num_seqs", args.max_num_seqs))
              if v is not None}
        offline_runs = {part: run_offline(part, args.quick, log, bw, mm, kw) for part in sorted(parts & {"offline",
                                                                                                         "nanovllm"})}
        for part, res in offline_runs.items():
            log(f"{part}: {res['output_tok_s']:.0f} out tok/s")
        path = write(args.out, f"engine_parts_{device_slug()}", dict(
            parts=sorted(parts), copy_bw_bytes_s=bw, matmul_bf16_flop_s=mm, llama3_8b=llama, offline=offline_runs,
            provenance=provenance("pdcli.benchmarks.engine", argv, quick=args.quick)))
        log(f"wrote {path} (the parts alone; engine_{device_slug()}.json is the whole run's)")
        return 0
    q8 = run_offline("offline", args.quick, log, bw, mm)
    nv = run_offline("nanovllm", args.quick, log)
    summary = dict(device=torch.cuda.get_device_name(), kernel_path=llama["kernel_path"],
                   decode_step_llama3_8b_bs1_ms=llama["decode"][0]["step_ms"], hf_generate_llama3_8b_bs1_ms=hf_ms,
                   ttft_llama3_8b_2k_ms=next(p["ttft_ms"] for p in llama["prefill"] if p["prompt_len"] == 2048),
                   offline_qwen3_8b_out_tok_s=q8["output_tok_s"], offline_nanovllm_protocol_out_tok_s=nv["output_tok_s"],
                   offline_qwen3_8b_bound_tok_s=q8.get("bound_tok_s"),
                   offline_qwen3_8b_run_bound_tok_s=q8.get("run_bound_tok_s"),
                   offline_qwen3_8b_serial_bound_tok_s=q8.get("serial_bound_tok_s"))
    for row in llama["decode"]:
        if row["batch"] in (64, 256):
            summary[f"decode_step_llama3_8b_bs{row['batch']}_ms"] = row["step_ms"]
            summary[f"decode_step_llama3_8b_bs{row['batch']}_roofline_ms"] = row["op_roofline_ms"]
    if llama["ttft_new_lengths"]:
        summary["ttft_llama3_8b_new_lengths_ms"] = llama["ttft_new_lengths"]["new_ms"]
        summary["ttft_llama3_8b_seen_lengths_ms"] = llama["ttft_new_lengths"]["seen_ms"]
    if llama["ttft_32k"]:
        summary["prefill_attn_kernel"] = prefill_attn_kernel()  # the paged prefill chunks after the first
        summary["ttft_llama3_8b_32k_ms"] = llama["ttft_32k"]["ttft_ms"]
        summary["ttft_llama3_8b_32k_floor_ms"] = llama["ttft_32k"]["floor_ms"]
    res = dict(copy_bw_bytes_s=bw, matmul_bf16_flop_s=mm, kernel_path=llama["kernel_path"], summary=summary,
               decode_llama3_8b=llama["decode"], decode_llama3_8b_breakdown=llama["breakdown"],
               prefill_llama3_8b=llama["prefill"], prefill_llama3_8b_breakdown=llama["prefill_breakdown"],
               offline_qwen3_8b=q8, offline_nanovllm_protocol=nv, ttft_llama3_8b_32k=llama["ttft_32k"],
               ttft_llama3_8b_new_lengths=llama["ttft_new_lengths"],
               provenance=provenance("pdcli.benchmarks.engine", argv, quick=args.quick))
    path = write(args.out, f"engine_{device_slug()}", res)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
