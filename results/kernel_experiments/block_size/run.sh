#!/bin/bash
# Issue 25 / 26, session 28: the engine's KV blocks at 64 tokens (the TMA prefill's boxes then 64 rows, FA3's
# intra-warpgroup overlap on): CUDA tests, decode at 16 against 64 (decode.py), then the kernel and engine
# benchmarks whose JSON is committed. From the repo root: bash results/kernel_experiments/block_size/run.sh
set -u
python -m pytest -q -x tests/test_kernels.py tests/test_kernel_prefill.py > "$OUT/tests.log" 2>&1
tail -2 "$OUT/tests.log"
if [ -z "${SKIP_DECODE:-}" ]; then  # SKIP_DECODE=1: not the decode.py comparison
  PYTHONPATH=$PWD timeout 150 python results/kernel_experiments/block_size/decode.py > "$OUT/block_size_decode.jsonl" 2>&1
  grep -v Warn "$OUT/block_size_decode.jsonl" | cut -c1-200
fi
PDCLI_REQUIRE_KERNEL=1 timeout 100 python -m pdcli.benchmarks.kernels --out "$OUT" > "$OUT/kernels.log" 2>&1
grep -E "^prefill" "$OUT/kernels.log"
timeout 230 python -m pdcli.benchmarks.engine --out "$OUT" > "$OUT/engine.log" 2>&1
grep -E "^decode|ttft|TTFT|offline|nanovllm|wrote" "$OUT/engine.log" | cut -c1-220
exit 0
