#!/bin/bash
# Issues 25 / 26: the next device call (~6 minutes), from the repo root of main:
#   bash results/kernel_experiments/next_call.sh   (OUT: the device tool's folder)
# Session 28 ran everything on H100s (results/kernel_experiments/block_size/): the TMA prefill with FA3's overlap at
# 1.04x / 0.96x SDPA (8k / 32k), KV blocks of 64 tokens, decode bs64 1.17x its per-op roofline (1.15x asked).
# - On an H200 (the H200 files are still session 26's code, block_size 16): the whole call that wrote session 28's
#   H100 files, committed as results/{kernels,engine}_nvidia-h200.json if its tests pass.
# - Batch 64's decode attention (0.93 ms a step against ~0.74 at the copy rate), prepared in session 27, never run:
#   three ways of running the balanced plan, now at the engine's 64-token blocks.
set -u
X=results/kernel_experiments
SKIP_DECODE=1 bash $X/block_size/run.sh
PYTHONPATH=$PWD timeout 120 python $X/decode_persistent/short_ctx.py > "$OUT/short_ctx.jsonl" 2>&1
tail -8 "$OUT/short_ctx.jsonl"
exit 0
