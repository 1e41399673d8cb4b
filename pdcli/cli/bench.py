from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Annotated, Optional

import typer

from pdcli.cli.common import DEFAULT_MODEL, EXIT_RUNTIME, Model, Mps, engine_options, fail


def _rates(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if ":" in part:  # start:stop:step
            a, b, c = (float(x) for x in part.split(":"))
            out += [round(a + i * c, 6) for i in range(int(math.floor((b - a) / c + 1e-9)) + 1)]
        else:
            out.append(math.inf if part == "inf" else float(part))
    if not out or any(r <= 0 for r in out):
        raise ValueError(f"bad --arrival-rate {text!r}: positive numbers, 'inf', a list or start:stop:step")
    return out


def _goodput(items: list[str], ttft: Optional[float], tpot: Optional[float]) -> dict:
    slos = {}
    for item in items or []:
        key, _, val = item.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not val:
            raise ValueError(f"bad --goodput {item!r}: use ttft:MS, tpot:MS or e2el:MS")
        slos[key] = float(val)
    if ttft is not None:
        slos.setdefault("ttft", ttft)
    if tpot is not None:
        slos.setdefault("tpot", tpot)
    return slos


@engine_options
def bench(
    model: Model = DEFAULT_MODEL,
    mode: Annotated[str, typer.Option(help="collocated, disaggregated, adaptive, threshold or all.")] = "collocated",
    devices: Annotated[str | None, typer.Option(help="Devices shared by every mode, e.g. cuda:0,cuda:1 or cpu,cpu "
                                                     "(default: every visible GPU, else cpu,cpu).")] = None,
    arrival_rate: Annotated[str, typer.Option("--arrival-rate", "--request-rate", help="Requests/s: a number, inf, a list or start:stop:step.")] = "inf",
    burstiness: Annotated[float, typer.Option(help="Gamma shape of the gaps: 1 = Poisson.")] = 1.0,
    workload: Annotated[str, typer.Option(help="short, long, mixed, random or sharegpt-like.")] = "random",
    num_prompts: Annotated[int, typer.Option(help="Requests per run.")] = 100,
    duration: Annotated[Optional[float], typer.Option(help="Instead of --num-prompts: rate x duration requests.")] = None,
    random_input_len: Annotated[int, typer.Option()] = 1024,
    random_output_len: Annotated[int, typer.Option()] = 128,
    random_range_ratio: Annotated[float, typer.Option()] = 0.0,
    warmup: Annotated[float, typer.Option(help="Seconds of arrivals left out of the statistics.")] = 0.0,
    seed: Annotated[int, typer.Option()] = 0,
    slo_ttft_ms: Annotated[Optional[float], typer.Option()] = None,
    slo_tpot_ms: Annotated[Optional[float], typer.Option()] = None,
    goodput: Annotated[Optional[list[str]], typer.Option(help="SLO as ttft:MS, tpot:MS or e2el:MS (repeatable).")] = None,
    params_dir: Annotated[Optional[str], typer.Option(help="Fitted cost model folder for --mode adaptive.")] = None,
    result_dir: Annotated[str, typer.Option()] = "results",
    save_detailed: Annotated[bool, typer.Option(help="Per-request arrays in the JSON.")] = False,
    drain_timeout: Annotated[float, typer.Option(help="Seconds to wait for the last requests.")] = 600.0,
    endpoint: Annotated[Optional[str], typer.Option(help="Load an OpenAI-compatible server instead (pdcli serve, vLLM, SGLang).")] = None,
    api_key: Annotated[Optional[str], typer.Option(help="Bearer key for --endpoint.")] = None,
    max_concurrency: Annotated[Optional[int], typer.Option(help="At most this many requests in flight (vLLM's flag).")] = None,
    num_prefill: Annotated[Optional[int], typer.Option(help="Devices that prefill in disaggregated mode (the first "
                                                          "ones; default: half), e.g. 2 of 3 for 2P1D.")] = None,
    mps: Mps = None,
    engine: dict = None,
) -> None:
    """Open-loop benchmark of each mode on the same devices and arrival trace -> results/*.json."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from pdcli import __version__
    from pdcli.bench.arrivals import arrival_times
    from pdcli.bench.metrics import max_rate_meeting, summarize
    from pdcli.bench.runner import MODES, layout_for, prompt_seed, rate_label, run_load, warmup_filter
    from pdcli.bench.workloads import make_requests
    from pdcli.coordinator.central import CentralScheduler
    from pdcli.workers.layout import collocated_only
    from pdcli.models.arch import ModelArch
    from pdcli.models.loader import ModelLoadError, resolve

    err = Console(stderr=True, highlight=False)
    try:
        rates = _rates(arrival_rate)
        slos = _goodput(goodput, slo_ttft_ms, slo_tpot_ms)
        modes = list(MODES) if mode == "all" else [mode]
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {max_concurrency}")
        if any(m not in MODES for m in modes):
            raise ValueError(f"unknown mode {mode!r}: {', '.join(MODES)} or all")
        if duration is not None and any(math.isinf(r) for r in rates):
            raise ValueError("--duration needs a finite --arrival-rate")
        if devices is None:
            devices = ",".join(f"cuda:{i}" for i in range(torch.cuda.device_count())) or "cpu,cpu"
        devs = [d.strip() for d in devices.split(",") if d.strip()]
        src = resolve(model)
        arch = ModelArch.from_hf_config(src.hf_config)
        max_len = engine["max_model_len"] or arch.max_position_embeddings
        kw = engine
    except (ValueError, ModelLoadError) as e:
        fail(str(e))
    os.makedirs(result_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows, paths = [], []
    if endpoint:
        from pdcli.bench.http_client import run_endpoint

        for i, rate in enumerate(rates):
            n = num_prompts if duration is None else max(1, int(rate * duration))
            reqs = make_requests(workload, n, prompt_seed(seed, i), arch.vocab_size, max_len, random_input_len,
                                 random_output_len, random_range_ratio)
            try:
                records = run_endpoint(endpoint, reqs, arrival_times(n, rate, burstiness, seed), api_key,
                                       timeout=drain_timeout, max_concurrency=max_concurrency)
            except Exception as e:
                fail(f"cannot reach {endpoint}: {e}", EXIT_RUNTIME)
            stats = summarize(warmup_filter(records, warmup), slos)
            row = dict(mode="endpoint", request_rate=rate_label(rate), burstiness=burstiness, workload=workload,
                       max_concurrency=max_concurrency, **stats)
            rows.append(row)
            name = f"{stamp}_endpoint_{workload}_rate{rate_label(rate)}.json"
            with open(os.path.join(result_dir, name), "w") as f:
                json.dump(dict(row, model=model, endpoint=endpoint, seed=seed, date=stamp,
                               provenance=dict(pdcli=__version__, command=" ".join(["pdcli", *sys.argv[1:]]))), f, indent=1)
            paths.append(os.path.join(result_dir, name))
        modes = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} done"),
                  TimeElapsedColumn(), console=err, transient=True) as progress:
        for m in modes:
            try:
                layout = layout_for(m, devs, num_prefill)
            except ValueError as e:
                fail(str(e))
            began = time.perf_counter()
            try:
                cs = CentralScheduler(model, layout, mode=m, sampling_seed=seed, params_dir=params_dir if m == "adaptive" else None,
                                      slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms,
                                      pd_on_collocated=collocated_only(layout, m), mps=mps, **kw)
            except (ValueError, RuntimeError, TimeoutError, OSError) as e:
                fail(f"mode {m}: {e}", EXIT_RUNTIME)
            err.print(f"{m}: {len(layout)} workers up in {time.perf_counter() - began:.0f} s")
            try:
                for i, rate in enumerate(rates):
                    began = time.perf_counter()
                    n = num_prompts if duration is None else max(1, int(rate * duration))
                    reqs = make_requests(workload, n, prompt_seed(seed, i), arch.vocab_size, max_len, random_input_len,
                                         random_output_len, random_range_ratio)
                    arrivals = arrival_times(n, rate, burstiness, seed)
                    task = progress.add_task(m, total=n)
                    records = run_load(cs, reqs, arrivals, m, drain_timeout, progress, task, max_concurrency)
                    stats = summarize(warmup_filter(records, warmup), slos)
                    row = dict(mode=m, request_rate=rate_label(rate), burstiness=burstiness, workload=workload,
                               max_concurrency=max_concurrency, **stats)
                    rows.append(row)
                    result = dict(row, model=model, seed=seed, num_warmup_excluded=len(records) - stats["num_prompts"],
                                  layout=[dict(rank=s.rank, role=s.role, device=s.device) for s in layout],
                                  pd_on_collocated=cs.pd_on_collocated, mps=cs.mps_on,
                                  devices=devs, kernel_path=cs.workers[0].info.get("kernel_path"),
                                  accounting=cs.accounting, date=stamp,
                                  provenance=dict(pdcli=__version__, torch=str(torch.__version__),
                                                  cuda=str(torch.version.cuda), command=" ".join(["pdcli", *sys.argv[1:]]),
                                                  device=(torch.cuda.get_device_name() if any(d.startswith("cuda") for d in devs)
                                                          else "cpu")))
                    if save_detailed:
                        result["requests"] = [dict(arrival=r.arrival, input_len=r.input_len, output_len=r.output_len,
                                                   ttft_ms=r.ttft_ms if r.ok else None, e2el_ms=r.e2el_ms if r.ok else None,
                                                   error=r.error, path=r.path, workers=list(r.workers),
                                                   predicted=r.predicted, predicted_raw=r.predicted_raw)
                                              for r in records]
                    name = f"{stamp}_{m}_{workload}_rate{rate_label(rate)}.json"
                    with open(os.path.join(result_dir, name), "w") as f:
                        json.dump(result, f, indent=1)
                    paths.append(os.path.join(result_dir, name))
                    err.print(f"{m} at {rate_label(rate)} req/s: {n} requests in {time.perf_counter() - began:.0f} s")
            finally:
                cs.shutdown()
    table = Table(title=f"{model} · {workload} · devices {devices}")
    for col in ("mode", "rate", "done/failed", "req/s", "out tok/s", "TTFT p50/p99 ms", "TPOT p50/p99 ms", "SLO ok"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["mode"], str(r["request_rate"]), f"{r['completed']}/{r['failed'] + r['aborted']}",
                      f"{r['request_throughput']:.2f}", f"{r['output_throughput']:.1f}",
                      f"{r['median_ttft_ms']:.0f}/{r['p99_ttft_ms']:.0f}", f"{r['median_tpot_ms']:.1f}/{r['p99_tpot_ms']:.1f}",
                      f"{r['slo_attainment']:.0%}" if "slo_attainment" in r else "-")
    err.print(table)
    if slos and len(rates) > 1:
        for m in modes or ["endpoint"]:
            best = max_rate_meeting([r for r in rows if r["mode"] == m])
            err.print(f"{m}: highest rate with >= 90% SLO attainment: {best if best is not None else 'none'}")
    for p in paths:
        print(p)
