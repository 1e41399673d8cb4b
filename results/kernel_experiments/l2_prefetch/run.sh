#!/bin/bash
# Needs the code of the experiment's commit (daad9a8 / 9d0441d), reverted after the run.
# Issue 26, session 29: L2 prefetch of the decoder weights' first lines under the short kernels ahead of their GEMMs.
# CUDA tests of the new kernel and the fused kernels, the decode sweep, then session 27's short-context attention
# experiment. From the repo root: bash results/kernel_experiments/l2_prefetch/run.sh   (OUT: the device tool's folder)
set -u
X=results/kernel_experiments
python -m pytest -q -x tests/test_kernel_fused.py > "$OUT/tests.log" 2>&1
tail -2 "$OUT/tests.log"
PYTHONPATH=$PWD timeout 300 python $X/l2_prefetch/sweep.py > "$OUT/sweep.jsonl" 2>&1
grep -v Warn "$OUT/sweep.jsonl" | grep -E '"batch": (64|256|1)|device'
PYTHONPATH=$PWD timeout 100 python $X/decode_persistent/short_ctx.py > "$OUT/short_ctx.jsonl" 2>&1
tail -3 "$OUT/short_ctx.jsonl"
exit 0
