"""The engine benchmark's decode step (dummy:llama3-8b, batch 1-256, context 256) with the tensor-core skinny matmul
on the linears of at least PDCLI_SKINNY_MIN_N output features (unset: cuBLAS everywhere), settings in turn and
repeated, one LLM at a time. Needs commit 9d0441d's code. From the repo root with PYTHONPATH=$PWD; JSON lines.
    python results/kernel_experiments/skinny_wgmma/engine_sweep.py [MIN_N|off ...]"""
import sys

sys.path.insert(0, "results/kernel_experiments")
from decode_env_sweep import sweep  # noqa: E402

sweep("PDCLI_SKINNY_MIN_N", sys.argv[1:] or ["off", "100000", "20000", "0", "off", "100000", "20000"], "skinny_min_n")
