"""Start-up of the CLI as a user meets it: `pdcli --help` against importing typer and rich, a second-run
`pdcli generate` against another checkout's (the commit before a change), and with --sequence the design
card's first commands in a fresh folder -> results/startup_<device>.json.

    python -m pdcli.benchmarks.startup [--before DIR] [--runs 12] [--sequence] [--out results]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from pdcli.benchmarks.results import provenance, write

GENERATE = ["generate", "What is the capital of France?"]
SEQUENCE = (["profile"], ["fit"], ["bench", "--arrival-rate", "0.3", "--workload", "long"], GENERATE)


def seconds(args: list[str], cwd: str | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def pdcli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pdcli", *args]


def interleaved(runs: int, before: str | None) -> dict:
    """Median seconds over `runs` interleaved runs (one warm-up each first)."""
    cases = {"help": (pdcli("--help"), None), "import_typer_rich": ([sys.executable, "-c", "import typer, rich"], None),
             "generate": (pdcli(*GENERATE), None)}
    if before:
        cases["generate_before"] = (pdcli(*GENERATE), before)  # `python -m pdcli` there runs that checkout
    for args, cwd in cases.values():
        seconds(args, cwd)
    times = {name: [] for name in cases}
    for _ in range(runs):
        for name, (args, cwd) in cases.items():
            times[name].append(seconds(args, cwd))
    return {name: dict(median_s=statistics.median(t), runs=t) for name, t in times.items()}


def sequence() -> dict:
    """The design card's commands with their defaults, one after the other, in a fresh folder."""
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        for args in SEQUENCE:
            out[" ".join(["pdcli", *args])] = seconds(pdcli(*args), folder)
        fitted = subprocess.run(pdcli("fit", "--no-plots"), cwd=folder, capture_output=True, text=True).stdout
    return dict(seconds=out, total_s=sum(out.values()), fit_table=fitted)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", help="another checkout (its root) to time `pdcli generate` in")
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--sequence", action="store_true", help="also the design card's sequence (minutes)")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    res = dict(device=f"cpu ({platform.machine()})", times=interleaved(args.runs, args.before))
    t = res["times"]
    res["summary"] = dict(help_s=t["help"]["median_s"], import_typer_rich_s=t["import_typer_rich"]["median_s"],
                          help_ratio=t["help"]["median_s"] / t["import_typer_rich"]["median_s"],
                          generate_s=t["generate"]["median_s"])
    if args.before:
        res["summary"].update(generate_before_s=t["generate_before"]["median_s"],
                              generate_ratio=t["generate"]["median_s"] / t["generate_before"]["median_s"])
    if args.sequence:
        res["sequence"] = sequence()
    res["provenance"] = provenance("pdcli.benchmarks.startup", argv)
    for k, v in res["summary"].items():
        print(f"{k}: {v:.3f}")
    print(f"wrote {write(args.out, 'startup_cpu', res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
