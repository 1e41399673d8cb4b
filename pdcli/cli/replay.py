"""`pdcli replay RUN_DIR --params-dir DIR`: re-predict every recorded decision of a saved run and print the
router's error per mode, rate and path."""
from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from pdcli.cli.common import fail


def replay(
    run_dir: Annotated[str, typer.Argument(help="Folder of `pdcli bench --save-detailed` JSON files.")],
    params_dir: Annotated[str, typer.Option(help="Fitted cost model folder (the one the run used).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON on stdout only.")] = False,
) -> None:
    """Re-predict each request's TTFT and TPOT from the state the router saw (recorded, or rebuilt from the
    records of older runs) and compare with what it measured."""
    from rich.console import Console
    from rich.table import Table

    from pdcli.router.fit import ProfileError, load_cost_model
    from pdcli.router.replay import load_runs, replay_table

    try:
        cm = load_cost_model(params_dir)
    except ProfileError as e:
        fail(str(e))
    runs = load_runs(run_dir)
    if not runs:
        fail(f"{run_dir} holds no bench results with per-request records (run `pdcli bench --save-detailed`)")
    rows = replay_table(runs, cm)
    if as_json:
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return
    table = Table(title=f"router replay of {run_dir} with {params_dir}")
    for col in ("mode", "rate", "path", "requests", "state", "TTFT err", "TTFT below", "TPOT err", "TPOT below"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["mode"], str(r["rate"]), r["path"], str(r["num_requests"]), r["state"],
                      *(f"{r[k]:.1%}" if k in r else "-" for k in ("ttft_err", "ttft_below", "tpot_err", "tpot_below")))
    Console().print(table)
