"""Issue 26: does decode attention overlap a GEMM when each runs in its own SM partition? run.py found that on two
plain streams the two hide almost nothing of each other (each fills every SM). Here the same pair (pdcli's paged
decode attention, batch 256, 1,536-token contexts; an [M, 4096] x [4096, 14336] bf16 GEMM) with the SMs split
between them: (a) CUDA green contexts (torch.cuda.green_contexts, a stream per partition), (b) cuBLAS's SM
carve-out (torch._C._set_sm_carveout_experimental) for the GEMM beside the attention on a plain stream. Per split:
each alone in its partition, both together, against the two one after the other on the whole GPU. JSON lines;
from the repo root:  PYTHONPATH=. python results/kernel_experiments/overlap_probe/green.py"""
import json

import torch

from run import decode_attention_call  # this folder's run.py


def ms_per_rep(launch, reps: int) -> float:
    """launch(reps) enqueues reps calls (on any streams, joined to the current one); ms per call."""
    launch(2)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    launch(reps)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def on_streams(jobs):
    """jobs: (stream, fn, enter, leave) each; returns launch(reps): every fn reps times on its stream, concurrently."""
    main = torch.cuda.current_stream()

    def launch(reps: int):
        for s, fn, enter, leave in jobs:
            s.wait_stream(main)
            enter()
            with torch.cuda.stream(s):
                for _ in range(reps):
                    fn()
            leave()
        for s, *_ in jobs:
            main.wait_stream(s)
    return launch


def main(batch: int = 256, ctx: int = 1536, reps: int = 20):
    attn, gen = decode_attention_call(batch, ctx)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    nop = lambda: None  # noqa: E731
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    try:
        from torch.cuda.green_contexts import GreenContext
        green = GreenContext if getattr(torch.cuda.green_contexts, "SUPPORTED", True) else None
    except ImportError:
        green = None
    print(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, sms=sms, batch=batch, ctx=ctx,
                          green_contexts=green is not None)), flush=True)
    for m in (2048, 8192):
        x = torch.randn(m, 4096, generator=gen, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(14336, 4096, generator=gen, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(m, 14336, device="cuda", dtype=torch.bfloat16)
        gemm = lambda: torch.mm(x, w.t(), out=y)  # noqa: E731
        a_full = ms_per_rep(on_streams([(s1, attn, nop, nop)]), reps)
        g_full = ms_per_rep(on_streams([(s2, gemm, nop, nop)]), reps)
        base = dict(m=m, attn_full_ms=round(a_full, 4), gemm_full_ms=round(g_full, 4), in_turn_ms=round(a_full + g_full, 4))
        for attn_sms in (24, 40, 56, 72):
            row = dict(base, attn_sms=attn_sms)
            try:  # (b) cuBLAS leaves attn_sms SMs to the attention
                torch._C._set_sm_carveout_experimental(attn_sms)
                row["carveout_gemm_ms"] = round(ms_per_rep(on_streams([(s2, gemm, nop, nop)]), reps), 4)
                both = ms_per_rep(on_streams([(s1, attn, nop, nop), (s2, gemm, nop, nop)]), reps)
                row["carveout_both_ms"] = round(both, 4)
            except Exception as e:  # noqa: BLE001
                row["carveout_error"] = repr(e)[:200]
            finally:
                torch._C._set_sm_carveout_experimental(None)
            if green is not None:
                try:  # (a) one green context per partition
                    ga, gg = green.create(num_sms=attn_sms), green.create(num_sms=sms - attn_sms)
                    sa, sg = ga.Stream(), gg.Stream()
                    ja = (sa, attn, ga.set_context, ga.pop_context)
                    jg = (sg, gemm, gg.set_context, gg.pop_context)
                    row["green_attn_ms"] = round(ms_per_rep(on_streams([ja]), reps), 4)
                    row["green_gemm_ms"] = round(ms_per_rep(on_streams([jg]), reps), 4)
                    row["green_both_ms"] = round(ms_per_rep(on_streams([ja, jg]), reps), 4)
                except Exception as e:  # noqa: BLE001
                    row["green_error"] = repr(e)[:300]
            for k in ("carveout_both_ms", "green_both_ms"):
                if k in row:
                    row[k.replace("_ms", "_vs_in_turn")] = round(row[k] / row["in_turn_ms"], 3)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
