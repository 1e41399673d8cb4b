from __future__ import annotations

import json
import os
from typing import Annotated, Optional

import typer

from pdcli.cli.common import fail


def plot(
    results: Annotated[list[str], typer.Argument(help="Result JSON files from pdcli bench.", show_default=False)],
    out: Annotated[Optional[str], typer.Option(help="Folder for the PNGs (default: next to the first JSON).")] = None,
) -> None:
    """PNG figures: throughput and latency vs rate per mode, latency CDFs, routing mix, router predictions."""
    rows = []
    for path in results:
        try:
            with open(path) as f:
                row = json.load(f)
        except (OSError, ValueError) as e:
            fail(f"cannot read {path}: {e}")
        if not isinstance(row, dict) or "mode" not in row or "output_throughput" not in row:
            fail(f"{path} is not a pdcli bench result (run `pdcli bench` to make one)")
        rows.append(row)
    from pdcli.bench.plots import plot_results

    for p in plot_results(rows, out or os.path.dirname(os.path.abspath(results[0]))):
        print(p)
