"""Bench result files on disk: `pdcli bench` writes `<stamp>_<mode>_<workload>_rate<R>.json`; a committed run
with per-request records may be kept gzipped (`.json.gz`: the records are 90% of its bytes and compress ~8x).
Every reader finds and opens results through here, so both forms read alike."""
from __future__ import annotations

import glob
import gzip
import json
import os

SUFFIXES = (".json", ".json.gz")


def find(folder: str, pattern: str = "*") -> list[str]:
    """The result files in folder whose name without its suffix matches pattern, sorted."""
    return sorted(p for s in SUFFIXES for p in glob.glob(os.path.join(folder, pattern + s)))


def read(path: str):
    """The JSON in path, gunzipped where its name ends in .gz."""
    if path.endswith(".gz"):
        with gzip.open(path, "rt") as f:
            return json.load(f)
    with open(path) as f:
        return json.load(f)


def finished(folder: str, mode: str, workload: str, rate: float) -> str | None:
    """The file of a finished (not interrupted) run of mode at this rate and workload in folder, else None: what
    `bench --resume` skips."""
    from pdcli.bench.runner import rate_label

    return next((p for p in find(folder, f"*_{mode}_{workload}_rate{rate_label(rate)}")
                 if not read(p).get("interrupted")), None)


def compress(path: str) -> str:
    """Rewrite a .json result as compact .json.gz (same content) and remove the .json; the new path."""
    data = read(path)
    out = path + ".gz"
    with gzip.open(out, "wt") as f:
        json.dump(data, f, separators=(",", ":"))
    os.remove(path)
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m pdcli.bench.result_files FOLDER...`: gzip the runs with per-request records in these folders
    (before committing them); other files are left as they are."""
    import sys

    for folder in (sys.argv[1:] if argv is None else argv):
        for path in find(folder):
            if not path.endswith(".json"):
                continue
            try:
                data = read(path)
            except ValueError:  # not JSON (a file being written): not a result
                continue
            if isinstance(data, dict) and data.get("requests") and "mode" in data:
                print(compress(path))


if __name__ == "__main__":
    main()
