#!/bin/bash
# Issues 25 / 26: the next device call (~6-8 minutes), from the repo root of the branch wip/next-gpu-run (main + the
# two unrun branches wip/argmax-rmsnorm and wip/prefill-tma, merged):
#   git checkout wip/next-gpu-run && bash results/kernel_experiments/next_call.sh   (OUT: the device tool's folder)
# - the CUDA tests of both: test_argmax_is_torchs, test_rms_norm at up to 4 vectors a thread, and the prefill tests
#   with wgmma_tma (the wgmma fixture, test_tma_loader_at_every_box_height against poisoned slots)
# - the kernels benchmark: prefill_attn_{8k,32k}_wgmma_tma_tflops against wgmma_ws and SDPA (issue 25 asks 0.9x SDPA)
# - the decode step (batch 1-256) and its breakdown: the argmax's reduce_kernel (0.036-0.051 ms a step on main's
#   H100 runs) should become argmax_parts + argmax_final; RMSNorm's 64 calls (0.16 ms at batch 64) a little shorter
# - sm_bandwidth (its binding renamed; it never built before): HBM bandwidth by SM count and way of reading
# If a test fails: the failing branch stays unmerged (fix it there). Else merge what measured faster into main.
set -u
X=results/kernel_experiments
python -m pytest -q -x tests/test_kernel_fused.py tests/test_kernels.py tests/test_split_attention.py \
  tests/test_kernel_prefill.py > "$OUT/tests.log" 2>&1
tail -3 "$OUT/tests.log"
PDCLI_REQUIRE_KERNEL=1 timeout 120 python -m pdcli.benchmarks.kernels --out "$OUT" > "$OUT/kernels.log" 2>&1
grep -E "^prefill" "$OUT/kernels.log"
timeout 150 python -m pdcli.benchmarks.engine --only decode,breakdown > "$OUT/decode.log" 2>&1
cp results/engine_parts_*.json "$OUT/" 2>/dev/null
grep -E "^decode|^bs64|^bs256" "$OUT/decode.log" | cut -c1-250
PYTHONPATH=$PWD timeout 120 python $X/sm_bandwidth/run.py > "$OUT/sm_bandwidth.jsonl" 2>&1
tail -3 "$OUT/sm_bandwidth.jsonl"
exit 0
