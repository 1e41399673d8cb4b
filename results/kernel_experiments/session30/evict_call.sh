#!/bin/bash
# Issue 26, session 30: does marking the decode's K/V reads L2 evict-first let a prefill run beside them?
# (1) the bulk reader beside a GEMM in green contexts, its copies marked evict-first (overlap_probe/reader_gemm.py);
# (2) the real model's decode graph captured in its partition beside the prefill (offline_overlap/probe.py
#     --captured-only), main's decode kernels, then with kv_evict_first.patch (the decode kernels' K/V cp.async
#     under an L2 evict-first policy) after the decode CUDA tests. From the repo root, OUT set.
set -u
X=results/kernel_experiments
PYTHONPATH=$PWD timeout 120 python $X/overlap_probe/reader_gemm.py --evict-first-only > "$OUT/reader_gemm_evict.jsonl" 2>&1
grep -v Warn "$OUT/reader_gemm_evict.jsonl" | cut -c1-200
if [ -n "${WITH_MAIN:-}" ]; then  # main's kernels too (the call's device time allowing; session 30 ran without)
  PYTHONPATH=$PWD timeout 200 python $X/offline_overlap/probe.py --captured-only > "$OUT/overlap_main.jsonl" 2>&1
  grep -v Warn "$OUT/overlap_main.jsonl" | cut -c1-300
fi
git apply $X/session30/kv_evict_first.patch || exit 1
timeout 150 python -m pytest -q -x tests/test_kernels.py -k decode > "$OUT/tests_evict.log" 2>&1
tail -2 "$OUT/tests_evict.log"
PYTHONPATH=$PWD timeout 150 python $X/offline_overlap/probe.py --captured-only > "$OUT/overlap_evict.jsonl" 2>&1
grep -v Warn "$OUT/overlap_evict.jsonl" | cut -c1-300
git apply -R $X/session30/kv_evict_first.patch
exit 0
