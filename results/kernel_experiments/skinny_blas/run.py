"""Issue 26: can cuBLAS do better on the decode step's skinny linears than torch's default call? Times
dummy:llama3-8b's linear shapes at 1-256 rows (bf16) through torch's default BLAS path, with cuBLASLt preferred
(`torch.backends.cuda.preferred_blas_library("cublaslt")`), and with the weight stored transposed ([K, N], x @ w),
each in a CUDA graph of 20 calls over weights that do not fit the L2 together; GB/s of weight bytes read against the
copy bandwidth. Prints one JSON line per (shape, rows); run from the repo root:  python results/kernel_experiments/skinny_blas/run.py"""
import json
import torch
import torch.nn.functional as F

from pdcli.benchmarks.device import copy_bandwidth
from pdcli.benchmarks.kernels import graph_us

SHAPES = dict(qkv=(6144, 4096), o=(4096, 4096), gate_up=(28672, 4096), down=(4096, 14336), lm_head=(128256, 4096))
ROWS = (1, 4, 16, 32, 64, 128, 256)


def main():
    dev = torch.device("cuda")
    bw = copy_bandwidth()
    print(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_bw_gb_s=bw / 1e9)), flush=True)
    for name, (n, k) in SHAPES.items():
        copies = max(2, int(200e6 // (n * k * 2)) + 1)  # > 100 MB of weights: each call reads from HBM
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
        wts = [w.t().contiguous() for w in ws]
        for m in ROWS:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            row = dict(shape=name, n=n, k=k, rows=m)
            for label, lib, fn in (("default", "default", lambda w, wt: F.linear(x, w)),
                                   ("cublaslt", "cublaslt", lambda w, wt: F.linear(x, w)),
                                   ("transposed", "default", lambda w, wt: x @ wt),
                                   ("transposed_lt", "cublaslt", lambda w, wt: x @ wt)):
                torch.backends.cuda.preferred_blas_library(lib)
                try:
                    us = graph_us([lambda w=w, wt=wt: fn(w, wt) for w, wt in zip(ws, wts)])
                except RuntimeError as e:  # a library that refuses the shape
                    row[label + "_error"] = str(e).splitlines()[0][:120]
                    continue
                row[label + "_us"] = round(us, 2)
                row[label + "_gb_s"] = round(n * k * 2 / us / 1e3, 1)
            torch.backends.cuda.preferred_blas_library("default")
            print(json.dumps(row), flush=True)
        del ws, wts
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
