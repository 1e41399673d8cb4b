#!/bin/bash
# Issue 26, session 29's last call (device time was short): the offline run's decode regime with decode_steps fixed,
# then the real model's prefill beside its decode (offline_overlap/probe.py). From the repo root (OUT: the tool's).
set -u
PYTHONPATH=$PWD timeout 130 python results/kernel_experiments/offline_regime/decode.py > "$OUT/offline_regime.jsonl" 2>&1
grep -v Warn "$OUT/offline_regime.jsonl" | tail -6
PYTHONPATH=$PWD timeout 120 python results/kernel_experiments/offline_overlap/probe.py > "$OUT/overlap.jsonl" 2>&1
grep -v Warn "$OUT/overlap.jsonl" | tail -8 | cut -c1-400
exit 0
