"""Issue 26 experiment: HBM bandwidth by number of SMs (one CTA each) and way of reading (probe.cu: 16-byte loads,
a cp.async ring, cp.async.bulk chunks on an mbarrier), each checked on a small buffer against numpy, then timed on
a 4 GB one (read once a call: no L2 reuse). JSON lines; from the repo root:
    python results/kernel_experiments/sm_bandwidth/run.py"""
import json
import os
import sys

import numpy as np
import torch
from torch.utils.cpp_extension import load

sys.path.insert(0, os.getcwd())
from pdcli.benchmarks.device import copy_bandwidth  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# (method, chunk bytes, stages): 0 ldg, 1 cp.async ring, 2 bulk ring
WAYS = ((0, 4096, 2), (1, 16384, 4), (1, 16384, 8), (2, 16384, 8), (2, 32768, 6), (2, 65536, 3))
SMS = (8, 16, 24, 32, 48, 66, 100, 132)


def build():
    d = os.path.join(os.getcwd(), ".kernel_build", "experiments", "sm_bandwidth")  # git-ignored
    os.makedirs(d, exist_ok=True)
    return load(name="sm_bandwidth", sources=[os.path.join(HERE, "bind.cpp"), os.path.join(HERE, "probe.cu")],
                build_directory=d, verbose=False,
                extra_cuda_cflags=["-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a"])


def expected(buf: torch.Tensor, n_ctas: int, method: int, chunk: int) -> np.ndarray:
    """Each CTA's checksum as the kernel computes it."""
    words = buf.view(torch.int32).cpu().numpy()
    per_cta = buf.numel() // n_ctas // chunk * chunk // 4
    out = []
    for b in range(n_ctas):
        w = words[b * per_cta:(b + 1) * per_cta]
        if method == 0:  # .x ^ .w of every 16 bytes
            out.append(np.bitwise_xor.reduce(w.reshape(-1, 4)[:, [0, 3]].ravel()))
        else:  # the first 256 words of every chunk
            out.append(np.bitwise_xor.reduce(w.reshape(-1, chunk // 4)[:, :256].ravel()))
    return np.array(out, dtype=np.int32)


def main():
    mod = build()
    small = torch.randint(-2 ** 31, 2 ** 31 - 1, (16 << 20,), dtype=torch.int32, device="cuda").view(torch.uint8)
    checks = {f"{m}/{c}/{s}": bool((mod.read_all(small, 8, m, c, s).cpu().numpy() == expected(small, 8, m, c)).all())
              for m, c, s in WAYS}
    bw = copy_bandwidth()
    print(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                          copy_bw_gb_s=round(bw / 1e9), right=checks)), flush=True)
    big = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    names = {0: "ldg", 1: "cp_async", 2: "bulk"}
    for n in SMS:
        row = dict(sms=n)
        for m, c, s in WAYS:
            mod.read_all(big, n, m, c, s)
            torch.cuda.synchronize()
            start.record()
            for _ in range(3):
                mod.read_all(big, n, m, c, s)
            end.record()
            torch.cuda.synchronize()
            nbytes = big.numel() // n // c * c * n
            gb_s = 3 * nbytes / (start.elapsed_time(end) / 1e3) / 1e9
            row[f"{names[m]}_{c // 1024}k_x{s}_gb_s"] = round(gb_s)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
