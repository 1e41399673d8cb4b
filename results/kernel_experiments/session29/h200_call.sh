#!/bin/bash
# Issue 26, session 29, the last device call (the device tool offered only an H200 by then): the engine benchmark
# with decode_steps fixed (01fcf08; the kernels as in call 4, whose CUDA tests passed on an H100), then the offline
# run's decode regime. From the repo root (OUT: the tool's folder).
set -u
timeout 300 python -m pdcli.benchmarks.engine --out "$OUT" > "$OUT/engine.log" 2>&1
grep -E "^decode|TTFT|offline|nanovllm|wrote|Error" "$OUT/engine.log" | cut -c1-230
PYTHONPATH=$PWD timeout 110 python results/kernel_experiments/offline_regime/decode.py > "$OUT/offline_regime.jsonl" 2>&1
grep -v Warn "$OUT/offline_regime.jsonl" | tail -6
exit 0
