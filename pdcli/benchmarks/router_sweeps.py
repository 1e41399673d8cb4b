"""Issue 20's router sweeps on one GPU, split over GPU calls of at most ~10 minutes: a plan file lists the
sweeps, one `pdcli bench` per line, each resumed from its result folder (`--resume` skips the rates done), so
the same plan can be run call after call until every line is done.

Plan lines (`#` starts a comment): FOLDER MODE WORKLOAD RATES SEED BURSTINESS [more `pdcli bench` arguments].
FOLDER is made results/router/<gpu>_FOLDER, <gpu> h100 or h200 from the device's name, and the runs use that
GPU's committed profile. Every run: dummy:llama3-8b, the issue's SLOs (TTFT 250 ms + 0.1 ms per prompt token,
TPOT 15 ms), 35 s of arrivals of which the first 5 s are the warm-up (30 s scored), --save-detailed.

    python -m pdcli.benchmarks.router_sweeps results/router/plans/h100.txt --budget 520 --bundle $OUT/res.tgz

A call for kind nvidia-h200 may land on an H100 and one for H100s may be refused for long: with `--expect-gpu h100`
the driver exits 3 on any other GPU before it builds or runs anything, so `... --expect-gpu h100 || [ $? != 3 ] ||
OTHER WORK` uses whichever GPU came.

Back here: `python -m pdcli.benchmarks.sweep_ingest res.tgz --params-dir PROFILE` (untar, drop the cut runs, gzip,
replay.json and plots), then commit: the next call resumes from them (a GPU call's tree is this one's: what a call
wrote there is gone at the next).

A line runs as many of its rates as the budget left holds (START_S for the workers' start, then --duration +
RATE_S a rate: on one H100 a line of n rates of 35 s took 5 + 37.5 n s, up to 1.5x the knee); the rest, and a
rate the budget still cuts off, run next time.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time

PROFILES = {"h100": "profiles/nvidia-h100-80gb-hbm3/dummy-llama3-8b", "h200": "profiles/nvidia-h200/dummy-llama3-8b"}
SLO_ARGS = ["--slo-ttft-ms", "250", "--slo-ttft-per-token-ms", "0.1", "--slo-tpot-ms", "15"]
START_S = 15.0  # s a line needs before its first rate: the workers' start
RATE_S = 4.0  # s a rate needs beyond its arrivals: its drain and the next rate's set-up
WRONG_GPU = 3  # exit status under --expect-gpu on another kind of GPU


def rates_that_fit(rates: list[str], left: float, duration: float) -> list[str]:
    """The first of rates that left seconds of budget hold, at START_S + (duration + RATE_S) a rate."""
    return rates[:max(0, int((left - START_S) // (duration + RATE_S)))]


def gpu_tag(name: str) -> str:
    """h100 / h200 from a CUDA device name."""
    for tag in PROFILES:
        if tag in name.lower():
            return tag
    raise SystemExit(f"no committed profile for {name!r}: one of {sorted(PROFILES)}")


def parse_plan(path: str) -> list[dict]:
    lines = []
    with open(path) as f:
        for n, raw in enumerate(f, 1):
            words = shlex.split(raw, comments=True)
            if not words:
                continue
            if len(words) < 6:
                raise SystemExit(f"{path}:{n}: FOLDER MODE WORKLOAD RATES SEED BURSTINESS [args], got {raw.strip()!r}")
            folder, mode, workload, rates, seed, burstiness, *extra = words
            lines.append(dict(folder=folder, mode=mode, workload=workload, rates=rates, seed=seed,
                              burstiness=burstiness, extra=extra))
    return lines


def result_dir(line: dict, tag: str) -> str:
    return f"results/router/{tag}_{line['folder']}"


def remaining_rates(line: dict, tag: str) -> list[str]:
    """The line's rates whose finished result (as `bench --resume` counts them) is not in its folder yet."""
    from pdcli.bench.result_files import finished

    return [r for r in line["rates"].split(",")
            if not finished(result_dir(line, tag), line["mode"], line["workload"], float(r))]


def bench_command(line: dict, tag: str, duration: float, warmup: float, rates: list[str]) -> list[str]:
    return [sys.executable, "-m", "pdcli", "bench", "--model", "dummy:llama3-8b", "--devices", "cuda:0",
            "--mode", line["mode"], "--workload", line["workload"], "--arrival-rate", ",".join(rates),
            "--burstiness", line["burstiness"], "--seed", line["seed"], "--duration", str(duration),
            "--warmup", str(warmup), *SLO_ARGS, "--max-model-len", "13000", "--save-detailed",
            "--params-dir", PROFILES[tag], "--result-dir", result_dir(line, tag), "--resume",
            *line["extra"]]


def run_within(cmd: list[str], log, seconds: float):
    """Run cmd (its own process group: bench and its workers) for at most `seconds`; past that, Ctrl-C it (bench
    aborts the requests in flight and stops its workers), then kill what is left. Its exit code, or "budget"."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return "budget"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plan")
    ap.add_argument("--budget", type=float, default=540.0, help="s for the whole call")
    ap.add_argument("--duration", type=float, default=35.0, help="s of arrivals per rate")
    ap.add_argument("--warmup", type=float, default=5.0, help="s of arrivals not scored")
    ap.add_argument("--gpu", help="h100 or h200 (default: from the CUDA device's name)")
    ap.add_argument("--expect-gpu", choices=sorted(PROFILES),
                    help=f"on another GPU exit {WRONG_GPU} before anything runs (a plan's sweeps stay on one kind "
                         "of GPU; a device call may land on either, and `|| ...` can then do other work)")
    ap.add_argument("--logs", default=os.environ.get("OUT", "."), help="folder for each line's console")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--bundle", help="at the end, a .tgz of the result files this call wrote (the GPU call's $OUT)")
    args = ap.parse_args(argv)
    lines = parse_plan(args.plan)
    if args.gpu:
        tag = args.gpu
    else:
        import torch

        tag = gpu_tag(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
    if args.expect_gpu and tag != args.expect_gpu:
        print(f"this GPU is an {tag}, the plan's sweeps run on an {args.expect_gpu}: nothing run", flush=True)
        sys.exit(WRONG_GPU)
    start = time.monotonic()
    if not args.dry_run:  # the kernels' JIT build once, before any worker (a failed build stops here, not per line)
        from pdcli.kernels import build

        build.load()
        print(f"{time.monotonic() - start:5.0f} s: kernels built", flush=True)
    for line in lines:
        rates = remaining_rates(line, tag)
        if not rates:
            continue
        if args.dry_run:
            print(shlex.join(bench_command(line, tag, args.duration, args.warmup, rates)[1:]), flush=True)
            continue
        left = args.budget - (time.monotonic() - start)
        fit = rates_that_fit(rates, left, args.duration)
        if not fit:
            print(f"skipped ({left:.0f} s left): {line['folder']} {line['mode']} {','.join(rates)}", flush=True)
            continue
        rates = fit
        cmd = bench_command(line, tag, args.duration, args.warmup, rates)
        log = os.path.join(args.logs, f"log_{tag}_{line['folder']}_{line['mode']}_s{line['seed']}.txt")
        print(f"{time.monotonic() - start:5.0f} s: {line['folder']} {line['mode']} {','.join(rates)} -> {log}", flush=True)
        with open(log, "a") as f:
            rc = run_within(cmd, f, left)
        with open(log) as f:
            tail = [s.strip() for s in f if "highest rate" in s or "Error" in s]
        print(f"        rc {rc}; {tail[-1] if tail else ''}", flush=True)
    if not args.dry_run:
        print(f"done in {time.monotonic() - start:.0f} s", flush=True)
    if args.bundle:
        print(f"{bundle(args.bundle, sorted({result_dir(x, tag) for x in lines}))} result files -> {args.bundle}")


def bundle(path: str, folders: list[str]) -> int:
    """Tar the plain .json results in folders (what a GPU call wrote: committed runs are gzipped) into path."""
    import glob
    import tarfile

    files = [f for d in folders for f in glob.glob(os.path.join(d, "2*.json"))]
    with tarfile.open(path, "w:gz") as tar:
        for f in files:
            tar.add(f)
    return len(files)


if __name__ == "__main__":
    main(sys.argv[1:])
