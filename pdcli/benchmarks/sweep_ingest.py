"""After a GPU call of router_sweeps, its results into the tree and what derives from them remade, in one command
(then commit, before the next call: a call runs on a copy of the committed tree):

  python -m pdcli.benchmarks.sweep_ingest BUNDLE.tgz --params-dir DIR

Untars the bundle's result files (paths under results/, from the repository's root), drops the runs a call's
budget cut (`"interrupted": true`: `bench --resume` runs them again), gzips the rest (result_files), and for each
folder touched writes replay.json (`pdcli replay --json` with DIR, the profile the runs used) and plots/
(`pdcli plot`) and prints each mode's SLO attainment per rate."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile

from pdcli.bench import result_files


def extract(bundle: str, root: str = ".") -> list[str]:
    """The bundle's files, written under root; only plain files under results/ (no absolute or .. paths)."""
    with tarfile.open(bundle, "r:gz") as tar:
        members = tar.getmembers()
        bad = [m.name for m in members if not m.isfile() or os.path.isabs(m.name) or ".." in m.name.split("/")
               or not m.name.startswith("results/")]
        if bad:
            raise ValueError(f"{bundle}: not a sweep bundle (members outside results/: {', '.join(bad[:3])})")
        tar.extractall(root, members=members)
    return [os.path.normpath(os.path.join(root, m.name)) for m in members]


def drop_interrupted(paths: list[str]) -> list[str]:
    """Remove the runs a call cut short; the ones removed."""
    cut = [p for p in paths if result_files.read(p).get("interrupted")]
    for p in cut:
        os.remove(p)
    return cut


def attainment_table(folder: str) -> str:
    """Each mode's SLO attainment per rate in folder, one line a mode."""
    by_mode: dict[str, dict[float, float]] = {}
    for path in result_files.find(folder):
        d = result_files.read(path)
        if isinstance(d, dict) and "mode" in d and d.get("slo_attainment") is not None:
            by_mode.setdefault(d["mode"], {})[float(d["request_rate"])] = d["slo_attainment"]
    return "\n".join(f"  {mode:14s} " + "  ".join(f"{r:g}: {a:.0%}" for r, a in sorted(rates.items()))
                     for mode, rates in sorted(by_mode.items()))


def remake(folder: str, params_dir: str | None, plots: bool = True) -> None:
    """replay.json with params_dir (None: not remade) and the plots of folder."""
    if params_dir:
        from pdcli.router.fit import load_cost_model
        from pdcli.router.replay import load_runs, replay_table

        table = replay_table(load_runs(folder), load_cost_model(params_dir))  # before replay.json is opened (emptied)
        with open(os.path.join(folder, "replay.json"), "w") as f:
            json.dump(table, f, indent=1)
            f.write("\n")
    if plots:
        subprocess.run([sys.executable, "-m", "pdcli", "plot", folder, "--out", os.path.join(folder, "plots")],
                       check=True, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--params-dir", help="the profile the runs used, for replay.json (none: not remade)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    paths = extract(args.bundle)
    for p in drop_interrupted(paths):
        print(f"dropped (interrupted): {p}")
    folders = sorted({os.path.dirname(p) for p in paths})
    result_files.main(folders)
    for folder in folders:
        remake(folder, args.params_dir, plots=not args.no_plots)
        print(f"{folder}:\n{attainment_table(folder)}")


if __name__ == "__main__":
    main(sys.argv[1:])
