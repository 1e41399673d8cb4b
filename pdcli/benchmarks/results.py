"""What every benchmark JSON under results/ carries (provenance), and writing it."""
from __future__ import annotations

import json
import os
import platform
import sys
import time

import torch

from pdcli import __version__


def provenance(module: str, argv: list[str] | None, program: str | None = None, **extra) -> dict:
    """Versions, date, the PDCLI_* environment and the command line: `python -m module` (or `program`, e.g. the
    `pdcli` script) and argv (default: sys.argv[1:])."""
    return dict(pdcli=__version__, torch=str(torch.__version__), cuda=str(torch.version.cuda),
                python=platform.python_version(), date=time.strftime("%Y-%m-%dT%H:%M:%S"),
                env={k: v for k, v in os.environ.items() if k.startswith("PDCLI_")},
                command=" ".join([program or f"python -m {module}", *(sys.argv[1:] if argv is None else argv)]),
                **extra)


def write(out_dir: str, stem: str, res: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{stem}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    return path
