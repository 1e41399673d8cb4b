"""KV handoff time between a prefill and a decode worker, written to results/pd_transfer_<device>.json.

    python -m pdcli.benchmarks.pd_transfer [--model dummy:qwen3-8b] [--prefill cuda:0] [--decode cuda:0]

The time is the prefill worker's, from posting the transfer to its completion (CUDA IPC copy on one
GPU, NCCL send between GPUs); the KV of one prompt, all layers.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys

import torch

from pdcli import SamplingParams
from pdcli.benchmarks.results import provenance, write
from pdcli.coordinator.central import CentralScheduler
from pdcli.kernels.bench import device_slug
from pdcli.workers.layout import parse_layout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dummy:qwen3-8b")
    ap.add_argument("--prefill", default="cuda:0")
    ap.add_argument("--decode", default="cuda:0")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    layout = parse_layout("", args.prefill, args.decode)
    rng = random.Random(0)
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with CentralScheduler(args.model, layout, max_model_len=args.prompt_len + 64, max_num_seqs=16,
                          startup_timeout=300) as cs:
        rows = []
        for _ in range(args.reps + 1):
            out = cs.generate([[rng.randrange(1000, 30000) for _ in range(args.prompt_len)]], p, mode="disaggregated",
                              timeout=120)[0]
            if out.error:
                print(f"error: {out.error}", file=sys.stderr)
                return 1
            rows.append(dict(bytes=out.metrics["transfer_bytes"], ms=out.metrics["transfer_s"] * 1e3))
        rows = rows[1:]  # the first maps the peer pool
    ms = statistics.median(r["ms"] for r in rows)
    nbytes = rows[0]["bytes"]
    res = dict(summary=dict(device=torch.cuda.get_device_name(), model=args.model, prompt_len=args.prompt_len,
                            kv_bytes=nbytes, transfer_ms=ms, gb_s=nbytes / ms / 1e6,
                            path="cuda-ipc" if args.prefill == args.decode else "nccl"),
               runs=rows, provenance=provenance("pdcli.benchmarks.pd_transfer", argv))
    print(f"{args.model} {args.prompt_len} tokens: {nbytes / 1e6:.0f} MB of KV in {ms:.2f} ms ({nbytes / ms / 1e6:.0f} GB/s)")
    path = write(args.out, f"pd_transfer_{device_slug()}", res)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
