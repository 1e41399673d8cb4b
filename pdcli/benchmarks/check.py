"""The GPU regression check, one command for the device: the CUDA tests, then the kernel and engine benchmarks
(into a scratch folder), then each summary figure against the committed results/<bench>_<device>.json,
flagging any more than --tolerance worse. Exit 1 on a failed test or a flagged figure. Writes the comparison
to --out/check_<device>.json.

    python -m pdcli.benchmarks.check            # on the GPU machine, from the checkout
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

TOLERANCE = 0.05
HIGHER_IS_BETTER = ("_tok_s", "_tflops", "_frac", "_gb_s")  # else lower is better (_ms, _us, _s)
REFERENCE = ("hf_", "sdpa", "floor", "roofline", "bound")  # baselines and bounds: shown, never flagged


def direction(key: str) -> int | None:
    """+1: higher is better, -1: lower is better, None: not a figure of ours (a baseline, a bound, a name)."""
    if any(r in key for r in REFERENCE):
        return None
    if key.endswith(HIGHER_IS_BETTER):
        return 1
    if key.endswith(("_ms", "_us", "_s")):
        return -1
    return None


def compare(new: dict, old: dict, tolerance: float = TOLERANCE) -> list[dict]:
    """One row per numeric summary key in both: change = new / old - 1; worse when it moves the wrong way by more
    than tolerance."""
    rows = []
    for key, was in old.items():
        now = new.get(key)
        if not isinstance(was, (int, float)) or not isinstance(now, (int, float)) or isinstance(was, bool) or not was:
            continue
        d = direction(key)
        change = now / was - 1
        worse = d is not None and -d * change > tolerance
        rows.append(dict(key=key, committed=was, now=now, change=change, worse=worse, reference=d is None))
    return rows


def _summary(path: str) -> dict:
    with open(path) as f:
        return json.load(f).get("summary", {})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tolerance", type=float, default=TOLERANCE)
    ap.add_argument("--results", default="results", help="the committed JSONs")
    ap.add_argument("--out", default="results")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--bench-out", default=None,
                    help="keep the fresh kernels_/engine_<device>.json here (default: a temporary folder, discarded)")
    args = ap.parse_args()
    import torch

    from pdcli.benchmarks.device import device_slug
    from pdcli.benchmarks.results import provenance, write

    dev = device_slug()
    failed = []
    if not args.skip_tests and subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests"]).returncode:
        failed.append("CUDA tests")
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.bench_out or scratch
        for bench in ("kernels", "engine"):
            if subprocess.run([sys.executable, "-m", f"pdcli.benchmarks.{bench}", "--out", tmp]).returncode:
                failed.append(f"{bench} benchmark")
                continue
            committed = os.path.join(args.results, f"{bench}_{dev}.json")
            if not os.path.exists(committed):
                print(f"{bench}: no committed {committed} to compare with")
                continue
            rows[bench] = compare(_summary(os.path.join(tmp, f"{bench}_{dev}.json")), _summary(committed),
                                  args.tolerance)
    for bench, rs in rows.items():
        for r in rs:
            mark = "WORSE" if r["worse"] else ("ref" if r["reference"] else "ok")
            print(f"{bench:8s} {r['key']:45s} {r['committed']:>12.4g} {r['now']:>12.4g} {r['change']:+7.1%} {mark}")
    flagged = [f"{b}.{r['key']}" for b, rs in rows.items() for r in rs if r["worse"]]
    write(args.out, f"check_{dev}", dict(device=torch.cuda.get_device_name(), tolerance=args.tolerance, rows=rows,
                                         flagged=flagged, failed=failed,
                                         provenance=provenance("pdcli.benchmarks.check", sys.argv[1:])))
    if failed or flagged:
        print("regressions: " + ", ".join(failed + flagged))
        return 1
    print("no regression")
    return 0


if __name__ == "__main__":
    sys.exit(main())
