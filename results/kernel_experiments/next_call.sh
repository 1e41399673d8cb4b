#!/bin/bash
# Issues 25 / 26: the next device call (~6-8 minutes), from the repo root of the branch wip/next-gpu-run (main + the
# two unrun branches wip/argmax-rmsnorm and wip/prefill-tma, merged):
#   git checkout wip/next-gpu-run && bash results/kernel_experiments/next_call.sh   (OUT: the device tool's folder)
# Session 27's last calls (results/kernel_experiments/next_gpu_run/) ran the branch's tests (all passed: wgmma_tma,
# argmax, RMSNorm) and found wgmma_tma right but slower (405 / 434 against wgmma_ws's 486 / 491 TFLOP/s at 8k / 32k,
# block_size 16) and the argmax's parts kernel 40 us at 256 rows (one load in flight a thread; now 4).
# - the CUDA tests again (the argmax changed; wgmma_tma's ring is now 3 stages, its first run was 2; main's decode
#   attention moved into three files after its last GPU build: decode_attention{.cu,.cuh,_persistent.cu})
# - prefill_tma/run.py: wgmma_tma against wgmma_ws at block sizes 16 / 64 / 128 (do 32 small boxes a tile cost it?)
# - the kernels benchmark, then the decode step (batch 1-256) and its breakdown: argmax_parts + argmax_final
#   against torch's reduce_kernel (0.036-0.051 ms a step on main's H100 runs); RMSNorm's 64 calls (0.146 ms at
#   batch 64 on the branch against 0.155-0.164 on main)
# - sm_bandwidth (its binding renamed; it never built before): HBM bandwidth by SM count and way of reading
# If a test fails: the failing branch stays unmerged (fix it there). Else merge what measured faster into main.
# A second call, for batch 64's attention (0.93 ms a step against 0.74 at the copy rate):
#   PYTHONPATH=$PWD python results/kernel_experiments/decode_persistent/short_ctx.py   (three ways, bs 64 / 256)
#   PYTHONPATH=$PWD ncu --kernel-name regex:persistent --set full -o $OUT/persist python \
#     results/kernel_experiments/decode_persistent/short_ctx.py --ncu-once
set -u
X=results/kernel_experiments
python -m pytest -q -x tests/test_kernel_fused.py tests/test_kernels.py tests/test_split_attention.py \
  tests/test_kernel_prefill.py > "$OUT/tests.log" 2>&1
tail -3 "$OUT/tests.log"
PYTHONPATH=$PWD timeout 150 python $X/prefill_tma/run.py > "$OUT/prefill_tma.jsonl" 2>&1
cat "$OUT/prefill_tma.jsonl"
PDCLI_REQUIRE_KERNEL=1 timeout 120 python -m pdcli.benchmarks.kernels --out "$OUT" > "$OUT/kernels.log" 2>&1
grep -E "^prefill" "$OUT/kernels.log"
timeout 150 python -m pdcli.benchmarks.engine --only decode,breakdown > "$OUT/decode.log" 2>&1
cp results/engine_parts_*.json "$OUT/" 2>/dev/null
grep -E "^decode|^bs64|^bs256" "$OUT/decode.log" | cut -c1-250
PYTHONPATH=$PWD timeout 120 python $X/sm_bandwidth/run.py > "$OUT/sm_bandwidth.jsonl" 2>&1
tail -3 "$OUT/sm_bandwidth.jsonl"
exit 0
