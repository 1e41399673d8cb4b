#!/bin/bash
# Issue 26, session 29: main's code (d8dea21's kernels; the session's two experiments reverted) -- CUDA tests, the
# kernel and engine benchmarks whose JSON is committed, then the offline run's decode regime (offline_regime/).
# From the repo root: bash results/kernel_experiments/final_call.sh   (OUT: the device tool's folder)
set -u
X=results/kernel_experiments
SKIP_DECODE=1 bash $X/block_size/run.sh
PYTHONPATH=$PWD timeout 120 python $X/offline_regime/decode.py > "$OUT/offline_regime.jsonl" 2>&1
grep -v Warn "$OUT/offline_regime.jsonl"
exit 0
