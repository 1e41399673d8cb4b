from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from pdcli.cli.common import DEFAULT_MODEL, EXIT_RUNTIME, Device, Model, engine_options, fail


@engine_options
def profile(
    model: Model = DEFAULT_MODEL,
    device: Device = None,
    out: Annotated[Optional[str], typer.Option(help="Folder (default: profiles/<device>/<model>).")] = None,
    max_seconds: Annotated[float, typer.Option(help="Bound on the step measurements, in seconds.")] = 240.0,
    transfer: Annotated[bool, typer.Option("--transfer/--no-transfer", help="Also measure the KV transfer path.")] = True,
    engine: dict = None,
) -> None:
    """Measure prefill, decode, interference and KV transfer on this hardware -> profile_data.pt."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from pdcli import LLM
    from pdcli.models.loader import ModelLoadError
    from pdcli.profiler import build_profile, device_name, profile_engine, profile_transfer, slug

    err = Console(stderr=True, highlight=False)
    kw = dict(engine, device=device)
    try:
        with err.status(f"loading {model}"):
            llm = LLM(model, **kw)
        engine = llm.engine
        folder = out or os.path.join("profiles", slug(device_name(engine.device)), slug(model))
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=err, transient=True) as progress:
            steps = profile_engine(engine, progress, max_seconds)
            moved = {}
            if transfer:
                dev = str(engine.device) if engine.device.type == "cuda" else "cpu"
                del llm, engine
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
                try:
                    moved = profile_transfer(model, dev, {k: v for k, v in kw.items() if k != "device"}, progress)
                except RuntimeError as e:
                    err.print(f"[yellow]no transfer profile: {e}[/yellow]")
                llm = LLM(model, **{**kw, "num_kv_blocks": 1})  # provenance only
            data = build_profile(llm.engine, model, steps, moved, " ".join(["pdcli", *sys.argv[1:]]))
    except (ValueError, ModelLoadError) as e:
        fail(str(e))
    except (RuntimeError, OSError) as e:
        fail(str(e), EXIT_RUNTIME)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "profile_data.pt")
    torch.save(data, path)
    n = sum(len(data[k]["ms"]) for k in ("prefill", "decode", "mixed"))
    err.print(f"{n} step timings and {sum(len(v['ms']) for v in data['transfer'].values())} transfers -> {path}")
    print(path)
