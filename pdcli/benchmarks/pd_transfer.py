"""KV handoff time between a prefill and a decode worker, written to results/pd_transfer_<device>.json.

    python -m pdcli.benchmarks.pd_transfer [--model dummy:qwen3-8b] [--prefill cuda:0] [--decode cuda:0]

Device time on the prefill worker for the KV of one prompt, all layers: CUDA IPC copy on one GPU; between
GPUs, an NCCL send of all layers after the prefill ("whole", from the end of the prefill to the end of the
send) and layer-wise sends during the last prefill chunk ("layers": what stays exposed after its last
layer).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys

import torch

from pdcli import SamplingParams
from pdcli.benchmarks.device import device_slug
from pdcli.benchmarks.results import provenance, write
from pdcli.coordinator.central import CentralScheduler
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
    ipc = args.prefill == args.decode
    runs = {}
    with CentralScheduler(args.model, layout, max_model_len=args.prompt_len + 64, max_num_seqs=16,
                          startup_timeout=300) as cs:
        for layerwise in ((False,) if ipc else (False, True)):
            cs.kv_layerwise = layerwise
            rows = []
            for _ in range(args.reps + 1):
                t = cs.submit([rng.randrange(1000, 30000) for _ in range(args.prompt_len)], p, "disaggregated")
                if not cs.wait_transfer(t, 120) or t.error or not t.transfer_kind:
                    print(f"error: {t.error or 'no transfer reported'}", file=sys.stderr)
                    return 1
                rows.append(dict(bytes=t.transfer_bytes, ms=t.transfer_s * 1e3, kind=t.transfer_kind,
                                 ttft_ms=(t.first_token_time - t.arrival) * 1e3))
            runs["ipc" if ipc else ("layers" if layerwise else "whole")] = rows[1:]  # the first sets the path up
    nbytes = next(iter(runs.values()))[0]["bytes"]
    summary = dict(device=torch.cuda.get_device_name(), model=args.model, prompt_len=args.prompt_len, kv_bytes=nbytes,
                   path="cuda-ipc" if ipc else "nccl")
    for kind, rows in runs.items():
        ms = statistics.median(r["ms"] for r in rows)
        if kind == "layers":  # what the prefill left exposed: from its last layer to the last send's end
            summary["layerwise_exposed_ms"] = ms
            summary["layerwise_kinds"] = sorted({r["kind"] for r in rows})
        else:
            summary.update(transfer_ms=ms, gb_s=nbytes / ms / 1e6)
        summary[f"{kind}_ttft_ms"] = statistics.median(r["ttft_ms"] for r in rows)
        print(f"{args.model} {args.prompt_len} tokens, {kind}: {nbytes / 1e6:.0f} MB of KV, {ms:.3f} ms"
              + ("" if kind == "layers" else f" ({nbytes / ms / 1e6:.0f} GB/s)") + " after the prefill")
    res = dict(summary=summary, runs=runs, provenance=provenance("pdcli.benchmarks.pd_transfer", argv))
    name = f"pd_transfer_{device_slug()}" + ("" if ipc else "_nccl")
    path = write(args.out, name, res)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
