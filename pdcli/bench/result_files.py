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


ROUTED_MODES = ("adaptive", "threshold")  # modes whose paths the router's code decides
ROUTED_KEYS = ("router", "profile")  # what only a routed mode's outcomes depend on (a static mode's run records
# the router's predictions, priced with the profile, but no path, step or token depends on them)
ROUTER_SOURCES = ("pdcli/router", "pdcli/coordinator/routing.py")  # that code, from the repository's root
ROUTER_OFFLINE = ("pdcli/router/replay.py",)  # in ROUTER_SOURCES but never run by a serving router


def setup(params_dir: str | None) -> dict:
    """What a run's numbers depend on beyond its command line, as short hashes: the CUDA kernels' sources, the
    fitted profile the router used (None: none) and the router's code. Runs of one sweep folder must share them
    (the router's and the profile, runs of the routed modes: ROUTED_KEYS): on 2026-12-05 a resumed sweep ran five
    rates on a changed decode kernel into a folder measured with the old one."""
    import hashlib

    from pdcli.kernels import build

    profile = None
    if params_dir and os.path.exists(os.path.join(params_dir, "params.json")):
        with open(os.path.join(params_dir, "params.json"), "rb") as f:
            profile = hashlib.sha256(f.read()).hexdigest()[:16]
    return dict(kernels=build.source_hash()[:16], profile=profile, router=router_hash())


def router_hash() -> str:
    """The router's sources (ROUTER_SOURCES, .py files) as a short hash."""
    import hashlib

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    h = hashlib.sha256()
    for src in ROUTER_SOURCES:
        path = os.path.join(root, src)
        files = [path] if os.path.isfile(path) else sorted(os.path.join(path, n) for n in os.listdir(path))
        for name in (f for f in files if f.endswith(".py") and os.path.relpath(f, root) not in ROUTER_OFFLINE):
            h.update(os.path.relpath(name, root).encode())
            with open(name, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def mismatched(folder: str, now: dict, modes: list[str] | None = None) -> list[tuple[str, dict]]:
    """The result files in folder whose recorded setup differs from `now` in a key both record, with that setup
    (runs made before results recorded one are not compared); the router's code and the profile (ROUTED_KEYS)
    only between runs of a routed mode, and of one of `modes` (those about to run; None: any)."""
    out = []
    for path in find(folder):
        try:
            d = read(path)
        except (ValueError, EOFError, OSError):  # not a result (a file being written)
            continue
        was = d.get("setup") if isinstance(d, dict) else None
        if not isinstance(was, dict):
            continue
        routed = d.get("mode") in ROUTED_MODES and (modes is None or d.get("mode") in modes)
        keys = [k for k in now if k not in ROUTED_KEYS or routed]
        if any(was.get(k) and now.get(k) and was[k] != now[k] for k in keys):
            out.append((path, was))
    return out


def compress(path: str) -> str:
    """Rewrite a .json result as compact .json.gz (same content) and remove the .json; the new path."""
    data = read(path)
    out = path + ".gz"
    with gzip.GzipFile(out, "wb", mtime=0) as f:  # no timestamp in the header: the same run, the same bytes
        f.write(json.dumps(data, separators=(",", ":")).encode())
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
