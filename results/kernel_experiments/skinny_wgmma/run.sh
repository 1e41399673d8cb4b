#!/bin/bash
# Needs the code of the experiment's commit (daad9a8 / 9d0441d), reverted after the run.
# Issue 26, session 29: the tensor-core skinny matmul for 5-64 rows. Its CUDA tests (and the fused kernels'), then
# its timing against cuBLAS. From the repo root: bash results/kernel_experiments/skinny_wgmma/run.sh
set -u
python -m pytest -q -x tests/test_kernel_fused.py -k "skinny or gemv" > "$OUT/tests.log" 2>&1
tail -5 "$OUT/tests.log"
PYTHONPATH=$PWD timeout 200 python results/kernel_experiments/skinny_wgmma/bench.py > "$OUT/bench.jsonl" 2>&1
grep -v Warn "$OUT/bench.jsonl" | cut -c1-400
exit 0
