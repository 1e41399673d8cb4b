"""The engine benchmark's decode step (dummy:llama3-8b, batch 1-256, context 256) with each decoder weight's first
lines read into L2 ahead of its GEMM (PDCLI_L2_PREFETCH_MB, csrc/l2_prefetch.cu) at several sizes, one LLM at a
time in one process, the settings in turn and repeated. Needs commit daad9a8's code (reverted after this run).
From the repo root with PYTHONPATH=$PWD; JSON lines.
    python results/kernel_experiments/l2_prefetch/sweep.py [SPEC ...]"""
import sys

sys.path.insert(0, "results/kernel_experiments")
from decode_env_sweep import sweep  # noqa: E402

sweep("PDCLI_L2_PREFETCH_MB", sys.argv[1:] or ["0", "8", "16", "qkv=8,o=4,gate_up=16,down=8", "32", "0", "8", "16"], "prefetch_mb")
