"""Issue 26, session 30: is a decode attention that draws HBM from few SMs worth building? The offline target needs
the prefill's GEMMs beside the decode's K/V reads; pdcli's decode attention needs ~100 of 132 SMs for the copy
rate, but cp.async.bulk reads reached it from 24-32 SMs (next_gpu_run2/sm_bandwidth.jsonl). Here such a reader
(sm_bandwidth/probe.cu's bulk ring, 64 KB x 3 stages, one CTA on each of n SMs, a 4 GB buffer read once a call)
beside a prefill-sized bf16 GEMM ([M, 4096] x [4096, 14336]) whose cuBLAS kernels leave n SMs free (torch's
experimental SM carve-out; no effect on these GEMMs, session 30's first rows), then each in a CUDA green
context of its own SMs, on two streams: each alone, both together, against the two one after the other on the
whole GPU; the reader's copies also marked L2 evict-first (sm_bandwidth's method 3). If both together come near the longer of the two alone, the split hides the GEMM under the reads.
JSON lines; from the repo root:  PYTHONPATH=$PWD python results/kernel_experiments/overlap_probe/reader_gemm.py"""
import importlib.util
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from green import ms_per_rep, on_streams  # noqa: E402

_spec = importlib.util.spec_from_file_location("sm_bandwidth_run", os.path.join(HERE, "..", "sm_bandwidth", "run.py"))
_sm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sm)
build = _sm.build

REPS, CHUNK, STAGES = 8, 65536, 3
EVICT_ONLY = "--evict-first-only" in sys.argv  # session 30's second run: the L2 hint rows alone


def main():
    mod = build()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    big = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    nop = lambda: None  # noqa: E731
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    reader = lambda n, method=2: (lambda: mod.read_all(big, n, method, CHUNK, STAGES))  # noqa: E731
    full_read = ms_per_rep(on_streams([(s1, reader(sms), nop, nop)]), REPS)
    print(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, sms=sms,
                          read_gb=4.29, read_full_ms=round(full_read, 3),
                          read_full_tb_s=round(big.numel() / full_read / 1e9, 2))), flush=True)
    for m in (2048, 8192):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(m, 14336, device="cuda", dtype=torch.bfloat16)
        reps = max(1, round(full_read / (2 * m * 4096 * 14336 / 700e12 * 1e3)))  # GEMMs a read lasts, roughly
        gemm = lambda: [torch.mm(x, w.t(), out=y) for _ in range(reps)]  # noqa: E731
        g_full = ms_per_rep(on_streams([(s2, gemm, nop, nop)]), REPS)
        base = dict(m=m, gemms_per_call=reps, gemm_full_ms=round(g_full, 3),
                    gemm_full_tflop_s=round(reps * 2 * m * 4096 * 14336 / g_full / 1e9, 1),
                    in_turn_ms=round(full_read + g_full, 3))
        for n, method in ((16, 2), (24, 2), (32, 2), (48, 2), (24, 3), (32, 3)) if not EVICT_ONLY else ((24, 3), (32, 3)):
            row = dict(base, reader_sms=n, evict_first=method == 3)
            try:
                torch._C._set_sm_carveout_experimental(n)
                r = ms_per_rep(on_streams([(s1, reader(n, method), nop, nop)]), REPS)
                g = ms_per_rep(on_streams([(s2, gemm, nop, nop)]), REPS)
                both = ms_per_rep(on_streams([(s1, reader(n, method), nop, nop), (s2, gemm, nop, nop)]), REPS)
                row.update(read_ms=round(r, 3), read_tb_s=round(big.numel() / r / 1e9, 2), gemm_ms=round(g, 3),
                           both_ms=round(both, 3), both_vs_in_turn=round(both / (full_read + g_full), 3),
                           both_vs_longer=round(both / max(r, g), 3))
            except Exception as e:  # noqa: BLE001
                row["error"] = repr(e)[:300]
            finally:
                torch._C._set_sm_carveout_experimental(None)
            try:  # green contexts: the reader on n SMs, the GEMMs on the rest
                from torch.cuda.green_contexts import GreenContext
                gr, gg = GreenContext.create(num_sms=n), GreenContext.create(num_sms=sms - n)
                jr = (gr.Stream(), reader(n, method), gr.set_context, gr.pop_context)
                jg = (gg.Stream(), gemm, gg.set_context, gg.pop_context)
                r, g = ms_per_rep(on_streams([jr]), REPS), ms_per_rep(on_streams([jg]), REPS)
                both = ms_per_rep(on_streams([jr, jg]), REPS)
                row.update(green_read_ms=round(r, 3), green_read_tb_s=round(big.numel() / r / 1e9, 2),
                           green_gemm_ms=round(g, 3), green_both_ms=round(both, 3),
                           green_both_vs_in_turn=round(both / (full_read + g_full), 3),
                           green_both_vs_longer=round(both / max(r, g), 3))
            except Exception as e:  # noqa: BLE001
                row["green_error"] = repr(e)[:300]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
