#!/bin/bash
# Issue 26, session 29: the offline run's decode regime alone (device time was short), with decode_steps fixed.
set -u
PYTHONPATH=$PWD timeout 200 python results/kernel_experiments/offline_regime/decode.py > "$OUT/offline_regime.jsonl" 2>&1
grep -v Warn "$OUT/offline_regime.jsonl" | tail -8
exit 0
