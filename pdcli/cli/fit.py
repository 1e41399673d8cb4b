from __future__ import annotations

import glob
import os
from typing import Annotated, Optional

import typer

from pdcli.cli.common import EXIT_RUNTIME, fail


def _default_folder() -> str:
    found = sorted(glob.glob(os.path.join("profiles", "*", "*", "profile_data.pt")), key=os.path.getmtime)
    if not found:
        fail("no profiles/<device>/<model>/profile_data.pt here: run `pdcli profile` first, or pass DIR")
    return os.path.dirname(found[-1])


def fit(
    folder: Annotated[Optional[str], typer.Argument(help="Folder with profile_data.pt (default: the newest under profiles/).")] = None,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Save fit.png next to params.json.")] = True,
) -> None:
    """Fit the cost model to a profile -> params.json, a fit table, plots and the regime map."""
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from pdcli.router.adaptive import AdaptiveRouter
    from pdcli.router.load import WorkerLoad
    from pdcli.router.fit import ProfileError, fit_profile, load_cost_model, load_profile, write_params

    console = Console()
    folder = folder or _default_folder()
    try:
        data = load_profile(folder)
        params = fit_profile(data, folder)
    except ProfileError as e:
        fail(str(e))
    except (ValueError, np.linalg.LinAlgError) as e:
        fail(f"cannot fit {folder}: {e}", EXIT_RUNTIME)
    path = write_params(folder, params)
    table = Table(title=f"cost model for {params['model']} on {params['device']}")
    for col in ("component", "parameters", "R²", "max rel err", "points"):
        table.add_column(col)
    names = dict(prefill="p0 floor ms, a0 ms, a1 ms/tok, a2 ms/(tok·prefix tok), a3 ms/tok²",
                 decode="d0 ms, d1 ms/seq, d2 ms/ctx-tok", interference="m0 ms, kd, kp, mf ms (mixed step)")
    for comp in ("prefill", "decode", "interference"):
        f = params[comp]
        table.add_row(comp, ", ".join(f"{v:.3g}" for v in f["params"]) + f"  ({names[comp]})", f"{f['r2']:.4f}",
                      f"{f['max_rel_err']:.1%}", str(f["num_points"]))
    for pair, f in params["transfer"].items():
        table.add_row(f"transfer {pair}", f"{f['t0_ms']:.3g} ms + bytes / {f['gb_s']:.3g} GB/s", f"{f['r2']:.4f}",
                      f"{f['max_rel_err']:.1%}", str(f["num_points"]))
    if params["decode"].get("shared_read") is not None:
        pts = data["shared_decode"]
        table.add_row("shared prefix in decode", f"{params['decode']['shared_read']:.2f} of a shared context token's "
                      "cost  (blocks shared in the batch)", "", "", str(len(pts["ms"])))
    sharing = params.get("sharing") or {}
    factors = {k: v for k, v in sharing.items() if not isinstance(v, list)}
    if factors:
        table.add_row("GPU sharing", ", ".join(f"{k} x{v:.2f}" for k, v in factors.items()), "", "", "")
    for key in ("prompt_beside_prefill_points", "decode_beside_prefill_points", "prompt_beside_decode_points"):
        if sharing.get(key):  # own step / neighbour's -> share of the neighbour's step it gains
            table.add_row(key.removesuffix("_points").replace("_", " "),
                          ", ".join(f"{r:.2g}: +{s:.2f}" for r, s in sharing[key]) + "  (own / neighbour step: +share "
                          "of it)", "", "", str(len(sharing[key])))
    console.print(table)
    if params["transfer"]:
        router = AdaptiveRouter(load_cost_model(folder))
        regime = Table(title="predicted path (prompt length x decode batch on each worker, prefill worker idle)")
        lens, loads = (128, 512, 2048, 8192, 32768), (1, 16, 64, 256)
        regime.add_column("prompt")
        for b in loads:
            regime.add_column(f"batch {b}")
        for L in lens:
            row = [router.decide(L, None, WorkerLoad(decode_batch=b, decode_ctx=b * 1024), WorkerLoad(),
                                 WorkerLoad(decode_batch=b, decode_ctx=b * 1024)).path for b in loads]
            regime.add_row(str(L), *row)
        console.print(regime)
    if plots:
        console.print(f"plots -> {_plot(folder, data, params)}")
    console.print(f"params -> {path}")


def _plot(folder: str, data: dict, params: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from pdcli.router.fit import load_cost_model

    fig, axes = plt.subplots(1, 3 + bool(params["transfer"]), figsize=(16, 4))
    p, d, m = data["prefill"], data["decode"], data["mixed"]
    cm = load_cost_model(folder)
    pre = cm.prefill_ms(np.asarray(p["n"]), np.asarray(p["c"]))
    dec = cm.decode_ms(np.asarray(d["batch"]), np.asarray(d["ctx"]))
    mix = cm.mixed_ms(np.asarray(m["batch"]), np.asarray(m["ctx"]), np.asarray(m["n"]), np.asarray(m["c"]))
    panels = [("prefill", p["ms"], pre), ("decode", d["ms"], dec), ("mixed", m["ms"], mix)]
    for pair, t in params["transfer"].items():
        panels.append((f"transfer {pair}", data["transfer"][pair]["ms"],
                       t["t0_ms"] + np.asarray(data["transfer"][pair]["bytes"]) / (t["gb_s"] * 1e6)))
    for ax, (name, meas, pred) in zip(axes, panels):
        ax.scatter(meas, pred, s=12)
        hi = max(max(meas, default=1), float(np.max(pred, initial=1)))
        ax.plot([0, hi], [0, hi], "k--", lw=0.8)
        ax.set_title(name)
        ax.set_xlabel("measured ms")
        ax.set_ylabel("model ms")
    fig.tight_layout()
    out = os.path.join(folder, "fit.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
