#!/bin/bash
# Issues 25 / 26's next two device calls, from the repo root (OUT: the device tool's output folder), each <= ~9
# minutes: `bash results/kernel_experiments/chunk_sdpa_h100/run.sh 1`, then `... run.sh 2` on the warm machine.
# Call 1: the aligned-chunk path's CUDA tests (merge kernel, grouped K/V heads); the 32k TTFT with the engine's own
# choice and with every later chunk through wgmma_ws (PDCLI_PREFILL_KERNEL=wgmma_ws turns the SDPA path off), each
# with the tuning's row and a kernel breakdown (results/engine_parts_<device>.json); whether a decode attention and a
# GEMM overlap on two streams (overlap_probe); Nsight Compute on one 8k causal prefill of wgmma_ws and of cuDNN's
# SDPA (ncu_prefill). Call 2: decode attention built with other CTA shapes (decode_variants); the decode step's
# skinny linears through cuBLAS / cuBLASLt / a transposed weight (skinny_blas).
set -u
X=results/kernel_experiments
if [ "${1:-1}" = 1 ]; then
  python -m pytest -q -x tests/test_kernel_prefill.py -k "cudnn or chunk or merge" > "$OUT/chunk_tests.log" 2>&1
  for k in auto wgmma_ws; do
    if [ $k = auto ]; then unset PDCLI_PREFILL_KERNEL; else export PDCLI_PREFILL_KERNEL=$k; fi
    timeout 150 python -m pdcli.benchmarks.engine --only ttft32k > "$OUT/ttft32k_$k.log" 2>&1
    cp results/engine_parts_*.json "$OUT/engine_parts_ttft32k_$k.json" 2>/dev/null
  done
  unset PDCLI_PREFILL_KERNEL
  timeout 60 python $X/overlap_probe/run.py > "$OUT/overlap_probe.jsonl" 2>&1
  timeout 180 ncu --clock-control none --profile-from-start off --set full -o "$OUT/prefill8k" \
    python $X/ncu_prefill/run.py > "$OUT/ncu.log" 2>&1 &&
    ncu --import "$OUT/prefill8k.ncu-rep" --page details --csv > "$OUT/prefill8k_details.csv" 2>>"$OUT/ncu.log"
else
  timeout 200 python $X/decode_variants/run.py > "$OUT/decode_variants.jsonl" 2>&1
  timeout 150 python $X/skinny_blas/run.py > "$OUT/skinny_blas.jsonl" 2>&1
fi
exit 0
