#!/bin/bash
# Issues 25 / 26: the next device call (~8 minutes), from the repo root (OUT: the device tool's output folder):
#   bash results/kernel_experiments/next_call.sh
# - first the decode and fused-kernel CUDA tests (blas_choice among them): merge_planned_kernel's new grid (batch x Hk CTAs of (D, group) threads, session 26)
#   has not yet run on a GPU
# - sm_bandwidth: HBM bandwidth by SM count and way of reading (does a bulk-copy decode attention have room?)
# - wgmma_ws with sleeping mbarrier waits (ws_sleep.patch) and the persistent grid with its loader's per-tile global
#   loads removed (ws_p2.patch) against main's, 8k-32k, plus the varlen check
# - the decode step (batch 1-256) and its kernel breakdown three ways: the engine's default now (cuBLASLt where the
#   start timed it faster, kernels/blas_choice.py, not yet run), PDCLI_BLAS_CHOICE=0 (as before), and cuBLASLt
#   everywhere (TORCH_BLAS_PREFER_CUBLASLT=1); in isolation at 64 rows the down projection read 9% faster through
#   cuBLASLt (skinny_blas/h100.jsonl)
set -u
X=results/kernel_experiments
python -m pytest -q -x tests/test_kernels.py tests/test_split_attention.py tests/test_kernel_fused.py > "$OUT/decode_tests.log" 2>&1
timeout 120 python $X/sm_bandwidth/run.py > "$OUT/sm_bandwidth.jsonl" 2>&1
WS_VARIANTS=ws_old,ws_sleep,ws_p2 timeout 240 python $X/wgmma_ws_overlap/run.py > "$OUT/ws_sleep.jsonl" 2>&1
for blas in choice off lt_everywhere; do
  unset PDCLI_BLAS_CHOICE TORCH_BLAS_PREFER_CUBLASLT
  if [ $blas = off ]; then export PDCLI_BLAS_CHOICE=0; fi
  if [ $blas = lt_everywhere ]; then export PDCLI_BLAS_CHOICE=0 TORCH_BLAS_PREFER_CUBLASLT=1; fi
  timeout 150 python -m pdcli.benchmarks.engine --only decode,breakdown > "$OUT/decode_$blas.log" 2>&1
  cp results/engine_parts_*.json "$OUT/engine_parts_decode_$blas.json" 2>/dev/null
done
exit 0
