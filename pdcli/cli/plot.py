from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from pdcli.cli.common import fail


def _files(results: list[str]) -> list[str]:
    """The JSON files named, and every *.json (or .json.gz) inside the folders named (bench --result-dir)."""
    from pdcli.bench import result_files

    files = []
    for path in results:
        if os.path.isdir(path):
            found = result_files.find(path)
            if not found:
                fail(f"{path} holds no .json files (run `pdcli bench --result-dir {path}` to make some)")
            files += found
        else:
            files.append(path)
    return files


def _load(path: str, in_folder: bool) -> dict | None:
    """A bench result; None for another JSON found in a folder (a plan, a profile's params)."""
    from pdcli.bench import result_files

    try:
        row = result_files.read(path)
    except (OSError, ValueError, EOFError) as e:
        fail(f"cannot read {path}: {e}")
    if not isinstance(row, dict) or "mode" not in row or "output_throughput" not in row:
        if in_folder:
            return None
        fail(f"{path} is not a pdcli bench result (run `pdcli bench` to make one)")
    return row


def plot(
    results: Annotated[list[str], typer.Argument(help="Result JSON files from pdcli bench, or folders of them.",
                                                 show_default=False)],
    out: Annotated[Optional[str], typer.Option(help="Folder for the PNGs (default: the folder given, else next to "
                                                    "the first JSON).")] = None,
) -> None:
    """PNG figures: throughput and latency vs rate per mode, latency CDFs, routing mix, router predictions."""
    folders = {os.path.abspath(p) for p in results if os.path.isdir(p)}
    rows = [r for f in _files(results) if (r := _load(f, os.path.dirname(os.path.abspath(f)) in folders))]
    if not rows:
        fail(f"no pdcli bench results in {', '.join(results)} (run `pdcli bench` to make some)")
    from pdcli.bench.plots import plot_results

    default = results[0] if os.path.isdir(results[0]) else os.path.dirname(os.path.abspath(results[0]))
    for p in plot_results(rows, out or default):
        print(p)
