#!/bin/bash
# Issue 26: the next device call (~5 minutes), from the repo root of a checkout of the branch wip/argmax-rmsnorm
# (main + the argmax kernel and the RMSNorm that keeps its row in registers, neither yet run on a GPU):
#   git checkout wip/argmax-rmsnorm && bash results/kernel_experiments/next_call.sh   (OUT: the device tool's folder)
# - the fused-kernel and decode CUDA tests (test_argmax_is_torchs, test_rms_norm at up to 4 vectors a thread)
# - the decode step (batch 1-256) and its breakdown: the argmax's reduce_kernel (0.036-0.051 ms a step on main's
#   H100 runs) should become argmax_parts + argmax_final; RMSNorm's 64 calls (0.16 ms at batch 64) a little shorter
# - sm_bandwidth (its binding renamed; it never built before): HBM bandwidth by SM count and way of reading
# If all is right and the step is no slower: merge the branch, then python -m pdcli.benchmarks.engine --out $OUT.
set -u
X=results/kernel_experiments
python -m pytest -q -x tests/test_kernel_fused.py tests/test_kernels.py tests/test_split_attention.py > "$OUT/tests.log" 2>&1
tail -3 "$OUT/tests.log"
timeout 150 python -m pdcli.benchmarks.engine --only decode,breakdown > "$OUT/decode.log" 2>&1
cp results/engine_parts_*.json "$OUT/" 2>/dev/null
grep -E "^decode|^bs64|^bs256" "$OUT/decode.log" | cut -c1-250
PYTHONPATH=$PWD timeout 120 python $X/sm_bandwidth/run.py > "$OUT/sm_bandwidth.jsonl" 2>&1
tail -3 "$OUT/sm_bandwidth.jsonl"
exit 0
