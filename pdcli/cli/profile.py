from __future__ import annotations

import os
import sys
import time
from typing import Annotated, Optional

import typer

from pdcli.cli.common import DEFAULT_MODEL, EXIT_RUNTIME, Device, Model, engine_options, fail

DEFAULT_MAX_SECONDS = 120.0
LINE_EVERY_S = 5.0  # plain progress lines: at most one per this many seconds within a stage


class PlainProgress:
    """Progress as plain lines on stderr (not a terminal): one when a stage starts or ends, and at most one
    every LINE_EVERY_S seconds in between."""

    def __init__(self, start: float):
        self.start, self.stage, self.last = start, None, 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def say(self, text: str) -> None:
        print(f"profile: {text}", file=sys.stderr, flush=True)

    def update(self, stage: str, done: int, total: int, left_s: float, unit: str = "points") -> None:
        now = time.monotonic()
        if stage == self.stage and done < total and now - self.last < LINE_EVERY_S:
            return
        self.stage, self.last = stage, now
        self.say(f"{stage} {done}/{total} {unit}, {now - self.start:.0f} s elapsed, ~{left_s:.0f} s left")


class RichProgress:
    """Progress bars on a terminal (stderr), one per stage, with the estimated time left of the profile."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console, self.tasks = console, {}
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[unit]}"), TimeElapsedColumn(),
                             TextColumn("~{task.fields[left]} left"), console=console, transient=True)

    def __enter__(self):
        self.bars.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.__exit__(*exc)

    def say(self, text: str) -> None:
        self.console.print(f"profile: {text}", soft_wrap=True)

    def update(self, stage: str, done: int, total: int, left_s: float, unit: str = "points") -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bars.add_task(stage, total=total, unit=unit, left="?")
        self.bars.update(self.tasks[stage], completed=done, total=total, left=f"{left_s:.0f} s")


@engine_options
def profile(
    model: Model = DEFAULT_MODEL,
    device: Device = None,
    out: Annotated[Optional[str], typer.Option(help="Folder (default: profiles/<device>/<model>).")] = None,
    max_seconds: Annotated[float, typer.Option(
        help="Time budget of the measurements in seconds (model loading and worker start-up aside): the step "
             "shapes and repeats are fitted to it from a few probe steps (smaller ones on a CPU); a quarter goes "
             "to the KV transfer.")] = DEFAULT_MAX_SECONDS,
    transfer: Annotated[bool, typer.Option("--transfer/--no-transfer", help="Also measure the KV transfer path.")] = True,
    dist_init_addr: Annotated[Optional[str], typer.Option(
        help="HOST:PORT: also measure handoffs across nodes, to the decode worker of a `pdcli node --node-rank 1` "
             "that joins there.")] = None,
    node_timeout: Annotated[float, typer.Option(min=0, help="s to wait for that node.")] = 600.0,
    sharing: Annotated[Optional[bool], typer.Option(
        "--sharing/--no-sharing", help="Also measure how a second worker's decode batch on the same device "
        "slows a decode and a prefill step (under MPS on a GPU); default: on GPUs.")] = None,
    sharing_only: Annotated[bool, typer.Option(
        "--sharing-only", help="Measure only what --sharing measures and add it to the profile already in --out "
        "(one made before --sharing existed, or without it); the rest of that profile is kept.")] = False,
    engine: dict = None,
) -> None:
    """Measure prefill, decode, interference and KV transfer on this hardware -> profile_data.pt."""
    from rich.console import Console

    from pdcli.models.loader import ModelLoadError

    if not max_seconds > 0:
        fail(f"--max-seconds must be positive, got {max_seconds}")
    err = Console(stderr=True, highlight=False)
    progress = RichProgress(err) if err.is_terminal else PlainProgress(time.monotonic())
    if sharing_only:
        return _add_sharing(model, dict(engine, device=device), out, progress, err)
    try:
        with progress:
            data, folder = _measure(model, dict(engine, device=device), out, max_seconds, transfer, progress)
            if sharing if sharing is not None else _on_gpu(device):
                data["sharing"] = _measure_sharing(model, dict(engine, device=device), progress)
            if transfer and dist_init_addr:
                data["transfer"].update(_measure_net(model, dict(engine, device=device), dist_init_addr,
                                                     node_timeout, progress))
    except (ValueError, ModelLoadError) as e:
        fail(str(e))
    except (RuntimeError, OSError, TimeoutError) as e:
        fail(str(e), EXIT_RUNTIME)
    import torch

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "profile_data.pt")
    torch.save(data, path)
    counts = ", ".join(f"{len(data[k]['ms'])} {k}" for k in ("prefill", "decode", "mixed"))
    err.print(f"{counts} step timings and {sum(len(v['ms']) for v in data['transfer'].values())} transfers -> {path}",
              soft_wrap=True)
    print(path)


def _measure(model: str, kw: dict, out: str | None, max_seconds: float, transfer: bool, progress) -> tuple[dict, str]:
    """Load, probe, plan, time the steps, then (the engine freed) the KV transfer -> (profile, its folder)."""
    import torch

    from pdcli import LLM
    from pdcli.profile_plan import describe
    from pdcli.profiler import build_profile, device_name, plan_engine, profile_engine, profile_transfer, slug

    progress.say(f"loading {model}")
    llm = LLM(model, **kw)
    engine = llm.engine
    tp = kw.get("tensor_parallel_size") or 1  # a TP size is profiled on its own (its steps, its shards' transfers)
    folder = out or os.path.join("profiles", slug(device_name(engine.device)), slug(model) + (f"-tp{tp}" if tp > 1 else ""))
    progress.say(f"probing step times on {device_name(engine.device)} for a plan of ~{max_seconds:.0f} s")
    plan = plan_engine(engine, max_seconds, transfer)
    progress.say(f"plan: {describe(plan)}")
    steps = profile_engine(engine, progress, plan=plan)
    command = " ".join(["pdcli", *sys.argv[1:]])
    data = build_profile(engine, model, steps, {}, command, max_seconds)
    if transfer:
        dev = str(engine.device) if engine.device.type == "cuda" else "cpu"
        del llm, engine
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        progress.say("starting a prefill and a decode worker for the KV transfer")
        served = {}
        try:
            data["transfer"] = profile_transfer(model, dev, {k: v for k, v in kw.items() if k != "device"}, progress,
                                                plan.transfer_lengths, plan.transfer_repeats, plan.transfer_est_s,
                                                plan.transfer_budget_s, served)
            if served:
                data["served_prefill"] = served
        except RuntimeError as e:
            progress.say(f"no transfer profile: {e}")
    return data, folder


def _on_gpu(device: str | None) -> bool:
    import torch

    return device.startswith("cuda") if device else torch.cuda.is_available()


def _measure_sharing(model: str, kw: dict, progress) -> dict:
    """A decode and a prefill step beside a decoding neighbour on the same device (profile_sharing.py)."""
    import torch

    from pdcli.profile_sharing import profile_sharing

    dev = kw.get("device") or ("cuda:0" if torch.cuda.is_available() else "cpu")
    progress.say("timing steps beside a second worker's decode batch on the same device")
    got = profile_sharing(model, dev, {k: v for k, v in kw.items() if k != "device"})
    progress.say(f"beside a decoding neighbour: decode step x{got['decode_beside_decode']:.2f}, prefill "
                 f"x{got['prefill_beside_decode']:.2f}; beside a prefilling one: decode x{got['decode_beside_prefill']:.2f}, "
                 f"prefill x{got['prefill_beside_prefill']:.2f}{' (MPS)' if got['mps'] else ''}")
    for g in got.get("beside_decode_grid", []) + got.get("beside_prefill_grid", []):
        own = f"{g['own']}-token prompt" if g["own"] else "decode batch"
        theirs = f"{g['neighbour']}-token prefills" if g["neighbour"] else \
            f"a decode batch of {g['neighbour_batch']}" if g.get("neighbour_batch") else "a decode batch"
        progress.say(f"{own} beside {theirs}: {g['own_alone_ms']:.1f} -> "
                     f"{g['own_beside_ms']:.1f} ms (+{(g['own_beside_ms'] - g['own_alone_ms']) / g['neighbour_ms']:.2f}"
                     f" of their {g['neighbour_ms']:.1f} ms step)")
    return got


def _add_sharing(model: str, kw: dict, out: str | None, progress, err) -> None:
    """--sharing-only: the sharing factors measured here, added to the profile in `out` (same model and device
    name), with their own provenance (sharing_provenance); the profile's other measurements are kept."""
    import datetime

    import torch

    from pdcli.profiler import device_name
    from pdcli.router.fit import ProfileError, load_profile

    if not out:
        fail("--sharing-only needs --out: the folder of the profile to add the factors to")
    path = os.path.join(out, "profile_data.pt")
    try:
        data = load_profile(out)
    except ProfileError as e:
        fail(f"--sharing-only: {e}")
    dev = kw.get("device") or ("cuda:0" if torch.cuda.is_available() else "cpu")
    here = device_name(torch.device(dev))
    if data.get("model") != model or data.get("device") != here:
        fail(f"--sharing-only: {path} profiles {data.get('model')} on {data.get('device')}, not {model} on {here}")
    try:
        with progress:
            data["sharing"] = _measure_sharing(model, kw, progress)
    except (RuntimeError, OSError, TimeoutError) as e:
        fail(str(e), EXIT_RUNTIME)
    now = datetime.datetime.now().isoformat(timespec="seconds")
    data["sharing_provenance"] = dict(command=" ".join(["pdcli", *sys.argv[1:]]), device=here,
                                      torch=str(torch.__version__), date=now)
    torch.save(data, path)
    err.print(f"sharing factors added to {path}; refit with: pdcli fit {out}", soft_wrap=True)
    print(path)


def _measure_net(model: str, kw: dict, dist_init_addr: str, node_timeout: float, progress) -> dict:
    """Handoffs to a node's decode worker: {"net": columns}."""
    import torch

    from pdcli.cluster.transport import parse_addr
    from pdcli.profiler import profile_transfer_net

    addr = parse_addr(dist_init_addr)
    dev = kw.get("device") or ("cuda:0" if torch.cuda.is_available() else "cpu")
    return profile_transfer_net(model, dev, {k: v for k, v in kw.items() if k != "device"}, addr, node_timeout,
                                progress)
