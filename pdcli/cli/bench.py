from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Annotated, Optional

import typer

from pdcli.cli.common import DEFAULT_MODEL, EXIT_INTERRUPTED, EXIT_RUNTIME, Model, Mps, engine_options, fail

MARKS = ("submitted", "dispatched", "received", "launched", "landed")  # where a first token's time went (s)


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


GPU_NUM_PROMPTS, CPU_NUM_PROMPTS = 100, 10  # a CPU run of the defaults takes a few minutes


@engine_options
def bench(
    model: Model = DEFAULT_MODEL,
    mode: Annotated[str, typer.Option(help="collocated, disaggregated, adaptive, threshold or all.")] = "collocated",
    devices: Annotated[str | None, typer.Option("--devices", "--device", help=(
        "Devices shared by every mode, e.g. cuda:0,cuda:1 or cpu,cpu (default: every visible GPU, else cpu,cpu)."))] = None,
    arrival_rate: Annotated[str, typer.Option("--arrival-rate", "--request-rate", help="Requests/s: a number, inf, a list or start:stop:step.")] = "inf",
    burstiness: Annotated[float, typer.Option(help="Gamma shape of the gaps: 1 = Poisson.")] = 1.0,
    workload: Annotated[str, typer.Option(help="random, short, long, mixed, sharegpt-like, bimodal or shared-prefix "
                                          "(pdcli/bench/workloads.py says what each is).")] = "random",
    num_prompts: Annotated[Optional[int], typer.Option(help=f"Requests per run (default: {GPU_NUM_PROMPTS} on GPUs, "
                                                          f"{CPU_NUM_PROMPTS} on CPUs).")] = None,
    duration: Annotated[Optional[float], typer.Option(help="Instead of --num-prompts: rate x duration requests.")] = None,
    random_input_len: Annotated[int, typer.Option()] = 1024,
    random_output_len: Annotated[int, typer.Option()] = 128,
    random_range_ratio: Annotated[float, typer.Option()] = 0.0,
    warmup: Annotated[float, typer.Option(help="Seconds of arrivals left out of the statistics.")] = 0.0,
    seed: Annotated[int, typer.Option()] = 0,
    slo_ttft_ms: Annotated[Optional[float], typer.Option()] = None,
    slo_tpot_ms: Annotated[Optional[float], typer.Option()] = None,
    slo_ttft_per_token_ms: Annotated[float, typer.Option(help="The TTFT SLO grows by this per prompt token "
                                                               "(--slo-ttft-ms 250 --slo-ttft-per-token-ms 0.1: "
                                                               "a 12k prompt gets 1.45 s).")] = 0.0,
    goodput: Annotated[Optional[list[str]], typer.Option(help="SLO as ttft:MS, tpot:MS or e2el:MS (repeatable).")] = None,
    params_dir: Annotated[Optional[str], typer.Option(help="Fitted cost model folder: routes --mode adaptive; "
                                                      "prices and records every mode's decisions.")] = None,
    result_dir: Annotated[str, typer.Option()] = "results",
    save_detailed: Annotated[bool, typer.Option(help="Per-request arrays in the JSON.")] = False,
    resume: Annotated[bool, typer.Option(help="Skip the (mode, rate) runs whose JSON --result-dir already holds "
                                              "(not interrupted): a long sweep split over several calls.")] = False,
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
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    err = Console(stderr=True, highlight=False)
    b = _Bench(model=model, mode=mode, devices=devices, arrival_rate=arrival_rate, burstiness=burstiness,
               workload=workload, num_prompts=num_prompts, duration=duration, random_input_len=random_input_len,
               random_output_len=random_output_len, random_range_ratio=random_range_ratio, warmup=warmup, seed=seed,
               slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms, slo_ttft_per_token_ms=slo_ttft_per_token_ms,
               goodput=goodput, params_dir=params_dir,
               result_dir=result_dir, save_detailed=save_detailed, resume=resume, drain_timeout=drain_timeout, endpoint=endpoint,
               api_key=api_key, max_concurrency=max_concurrency, num_prefill=num_prefill, mps=mps, engine=engine)
    _resolve(b, err)
    if b.resume:
        _check_resume(b)
    os.makedirs(b.result_dir, exist_ok=True)
    b.stamp = time.strftime("%Y%m%d-%H%M%S")
    rows, paths, interrupted = [], [], False
    modes = [] if b.endpoint else b.modes
    try:
        if b.endpoint:
            _bench_endpoint(b, rows, paths)
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} done"),
                      TimeElapsedColumn(), console=err, transient=True) as progress:
            for m in modes:
                _bench_mode(b, m, progress, err, rows, paths)
    except KeyboardInterrupt:
        interrupted = True
    _print_table(b, rows, modes, err)
    _print_outputs(b, paths, err)
    if interrupted:
        err.print("interrupted: the results above are those that finished (their JSON says interrupted)")
        raise typer.Exit(EXIT_INTERRUPTED)


def _print_outputs(b: _Bench, paths: list[str], err) -> None:
    """The result files (stdout) and how to plot them (stderr)."""
    for p in paths:
        print(p)
    if paths:
        err.print(f"{len(paths)} result file(s) in {b.result_dir}; plot them with: "
                  f"pdcli plot {os.path.join(b.result_dir, b.stamp + '_*.json')}")


@dataclass
class _Bench:
    """The options of one `pdcli bench`, and what _resolve makes of them."""
    model: str
    mode: str
    devices: str | None  # as given; _resolve fills in the default
    arrival_rate: str
    burstiness: float
    workload: str
    num_prompts: int
    duration: float | None
    random_input_len: int
    random_output_len: int
    random_range_ratio: float
    warmup: float
    seed: int
    slo_ttft_ms: float | None
    slo_tpot_ms: float | None
    slo_ttft_per_token_ms: float
    goodput: list[str] | None
    params_dir: str | None
    result_dir: str
    save_detailed: bool
    resume: bool
    drain_timeout: float
    endpoint: str | None
    api_key: str | None
    max_concurrency: int | None
    num_prefill: int | None
    mps: bool | None
    engine: dict
    rates: list[float] = field(default_factory=list)  # requests/s
    slos: dict = field(default_factory=dict)  # metric -> ms
    modes: list[str] = field(default_factory=list)
    devs: list[str] = field(default_factory=list)
    vocab_size: int = 0
    max_len: int = 0
    stamp: str = ""  # of the result file names
    setup: dict = field(default_factory=dict)  # result_files.setup: kernel sources', profile's and router's hashes


def _resolve(b: _Bench, err) -> None:
    """Check the options and resolve rates, SLOs, modes, devices and the model's vocabulary and length;
    a bad option or model exits with a usage error."""
    import torch

    from pdcli.bench import result_files
    from pdcli.bench.runner import MODES
    from pdcli.models.arch import ModelArch
    from pdcli.models.loader import ModelLoadError, resolve

    try:
        b.rates = _rates(b.arrival_rate)
        b.slos = _goodput(b.goodput, b.slo_ttft_ms, b.slo_tpot_ms)
        if b.slo_ttft_per_token_ms:
            if "ttft" not in b.slos:
                raise ValueError("--slo-ttft-per-token-ms needs a TTFT SLO (--slo-ttft-ms)")
            b.slos["ttft_per_token"] = b.slo_ttft_per_token_ms
        b.modes = list(MODES) if b.mode == "all" else [b.mode]
        if b.max_concurrency is not None and b.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {b.max_concurrency}")
        if any(m not in MODES for m in b.modes):
            raise ValueError(f"unknown mode {b.mode!r}: {', '.join(MODES)} or all")
        if b.duration is not None and any(math.isinf(r) for r in b.rates):
            raise ValueError("--duration needs a finite --arrival-rate")
        if b.devices is None:
            b.devices = ",".join(f"cuda:{i}" for i in range(torch.cuda.device_count())) or "cpu,cpu"
        b.devs = [d.strip() for d in b.devices.split(",") if d.strip()]
        if b.num_prompts is None and b.duration is None:
            on_gpu = any(d.startswith("cuda") for d in b.devs) or b.endpoint is not None
            b.num_prompts = GPU_NUM_PROMPTS if on_gpu else CPU_NUM_PROMPTS
            if not on_gpu:
                err.print(f"cpu: {CPU_NUM_PROMPTS} prompts per run by default (a few minutes); --num-prompts N for more")
        arch = ModelArch.from_hf_config(resolve(b.model).hf_config)
        b.vocab_size, b.max_len = arch.vocab_size, b.engine["max_model_len"] or arch.max_position_embeddings
        b.setup = result_files.setup(b.params_dir)
    except (ValueError, ModelLoadError) as e:
        fail(str(e))


def _requests(b: _Bench, rate: float) -> tuple[int, list]:
    """The number and the requests of the run at this rate (the same in every mode)."""
    from pdcli.bench.runner import prompt_seed
    from pdcli.bench.workloads import make_requests

    n = b.num_prompts if b.duration is None else max(1, int(rate * b.duration))
    return n, make_requests(b.workload, n, prompt_seed(b.seed, rate), b.vocab_size, b.max_len, b.random_input_len,
                            b.random_output_len, b.random_range_ratio)


def _row(b: _Bench, mode: str, rate: float, stats: dict) -> dict:
    from pdcli.bench.runner import rate_label

    return dict(mode=mode, request_rate=rate_label(rate), burstiness=b.burstiness, workload=b.workload,
                max_concurrency=b.max_concurrency, **stats)


def _bench_endpoint(b: _Bench, rows: list[dict], paths: list[str]) -> None:
    """Each rate's load against --endpoint, appending table rows and result JSON paths."""
    from pdcli.bench.arrivals import arrival_times
    from pdcli.bench.http_client import run_endpoint
    from pdcli.bench.metrics import summarize
    from pdcli.bench.runner import rate_label, warmup_filter
    from pdcli.benchmarks.results import provenance, write

    for rate in b.rates:
        n, reqs = _requests(b, rate)
        try:
            records = run_endpoint(b.endpoint, reqs, arrival_times(n, rate, b.burstiness, b.seed), b.api_key,
                                   timeout=b.drain_timeout, max_concurrency=b.max_concurrency)
        except Exception as e:
            fail(f"cannot reach {b.endpoint}: {e}", EXIT_RUNTIME)
        row = _row(b, "endpoint", rate, summarize(warmup_filter(records, b.warmup), b.slos))
        rows.append(row)
        result = dict(row, model=b.model, endpoint=b.endpoint, seed=b.seed, date=b.stamp,
                      provenance=provenance("pdcli", None, program="pdcli"))
        paths.append(write(b.result_dir, f"{b.stamp}_endpoint_{b.workload}_rate{rate_label(rate)}", result))


def _bench_mode(b: _Bench, m: str, progress, err, rows: list[dict], paths: list[str]) -> None:
    """Mode m's workers on the devices, each rate's load through them, appending table rows and result JSON
    paths; each rate's JSON is written when it ends, and on Ctrl-C what finished, marked interrupted."""
    from pdcli.bench.arrivals import arrival_times
    from pdcli.bench.runner import LoadInterrupted, rate_label, run_load

    todo = [rate for rate in b.rates if not (b.resume and _done(b, m, rate, err))]
    if not todo:
        return
    layout, cs = _start_workers(b, m, err)
    try:
        for rate in todo:
            began = time.perf_counter()
            n, reqs = _requests(b, rate)
            arrivals = arrival_times(n, rate, b.burstiness, b.seed)
            task = progress.add_task(m, total=n)
            try:
                records = run_load(cs, reqs, arrivals, m, b.drain_timeout, progress, task, b.max_concurrency)
            except LoadInterrupted as stop:
                _write_rate(b, m, rate, stop.records, layout, cs, rows, paths, interrupted=True)
                raise KeyboardInterrupt from None
            _write_rate(b, m, rate, records, layout, cs, rows, paths)
            err.print(f"{m} at {rate_label(rate)} req/s: {n} requests in {time.perf_counter() - began:.0f} s")
    finally:
        cs.shutdown()


def _check_resume(b: _Bench) -> None:
    """--resume adds to a folder only runs of the same kernels and profile as those already in it (and, for a
    routed mode, the same router code as its runs there)."""
    from pdcli.bench import result_files

    bad = result_files.mismatched(b.result_dir, b.setup, b.modes)
    if bad:
        path, was = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        fail(f"--resume: {path}{more} ran with kernels {was.get('kernels')}, profile {was.get('profile')} and "
             f"router {was.get('router')}, this run has {b.setup['kernels']}, {b.setup['profile']} and "
             f"{b.setup['router']}: resume with those, or start a new --result-dir")


def _done(b: _Bench, m: str, rate: float, err) -> bool:
    """--resume: a finished run of mode m at this rate (same workload) is in the result folder already."""
    from pdcli.bench import result_files
    from pdcli.bench.runner import rate_label

    path = result_files.finished(b.result_dir, m, b.workload, rate)
    if path:
        err.print(f"{m} at {rate_label(rate)} req/s: done already ({path})")
    return path is not None


def _write_rate(b: _Bench, m: str, rate: float, records: list, layout, cs, rows: list[dict], paths: list[str],
                interrupted: bool = False) -> None:
    from pdcli.bench.metrics import summarize
    from pdcli.bench.runner import rate_label, warmup_filter
    from pdcli.benchmarks.results import write

    stats = summarize(warmup_filter(records, b.warmup), b.slos)
    rows.append(_row(b, m, rate, stats))
    result = _result(b, rows[-1], records, stats, layout, cs)
    if interrupted:
        result["interrupted"] = True
    paths.append(write(b.result_dir, f"{b.stamp}_{m}_{b.workload}_rate{rate_label(rate)}", result))


def _start_workers(b: _Bench, m: str, err):
    """Mode m's layout on the devices and its CentralScheduler, workers up; a failure exits."""
    from pdcli.bench.runner import layout_for
    from pdcli.coordinator.central import CentralScheduler
    from pdcli.workers.layout import pd_on_collocated

    try:
        layout = layout_for(m, b.devs, b.num_prefill, b.engine.get("tensor_parallel_size") or 1)
    except ValueError as e:
        fail(str(e))
    began = time.perf_counter()
    try:
        cs = CentralScheduler(b.model, layout, mode=m, sampling_seed=b.seed,
                              params_dir=b.params_dir, slo_ttft_ms=b.slo_ttft_ms,
                              slo_tpot_ms=b.slo_tpot_ms, slo_ttft_per_token_ms=b.slo_ttft_per_token_ms,
                              pd_on_collocated=pd_on_collocated(layout, m), mps=b.mps,
                              **b.engine)
    except (ValueError, RuntimeError, TimeoutError, OSError) as e:
        fail(f"mode {m}: {e}", EXIT_RUNTIME)
    err.print(f"{m}: {len(layout)} workers up in {time.perf_counter() - began:.0f} s")
    return layout, cs


def _result(b: _Bench, row: dict, records: list, stats: dict, layout, cs) -> dict:
    """The JSON of one mode at one rate: its row, the setup, provenance and, with --save-detailed, each request."""
    import torch

    from pdcli.benchmarks.results import provenance

    device = torch.cuda.get_device_name() if any(d.startswith("cuda") for d in b.devs) else "cpu"
    result = dict(row, model=b.model, seed=b.seed, num_warmup_excluded=len(records) - stats["num_prompts"],
                  layout=[dict(rank=s.rank, role=s.role, device=s.device, **_kv_capacity(cs, s.rank)) for s in layout],
                  pd_on_collocated=cs.pd_on_collocated, mps=cs.mps_on,
                  devices=b.devs, kernel_path=cs.workers[0].info.kernel_path,
                  accounting=cs.accounting, date=b.stamp, setup=b.setup,
                  provenance=provenance("pdcli", None, program="pdcli", device=device))
    if b.save_detailed:
        result["requests"] = [dict(arrival=r.arrival, input_len=r.input_len, output_len=r.output_len,
                                   ttft_ms=r.ttft_ms if r.ok else None, e2el_ms=r.e2el_ms if r.ok else None,
                                   error=r.error, path=r.path, workers=list(r.workers),
                                   predicted=r.predicted, predicted_raw=r.predicted_raw,
                                   **(dict(decision=r.decision) if r.decision else {}),
                                   **{k: round(getattr(r, k), 6) for k in MARKS if getattr(r, k) is not None})
                              for r in records]
    return result


def _kv_capacity(cs, rank: int) -> dict:
    """A worker's KV pool as it came up: blocks and the tokens they hold (the one-GPU layouts split memory)."""
    w = next((w for w in cs.workers if w.spec.rank == rank and w.info is not None), None)
    if w is None:
        return {}
    return dict(num_kv_blocks=w.info.num_blocks, kv_capacity_tokens=w.info.num_blocks * cs.block_size)


def _print_table(b: _Bench, rows: list[dict], modes: list[str], err) -> None:
    """One line per run and, with SLOs over several rates, each mode's highest rate that meets them."""
    from rich.table import Table

    from pdcli.bench.metrics import max_rate_meeting

    table = Table(title=f"{b.model} · {b.workload} · devices {b.devices}")
    for col in ("mode", "rate", "done/failed/aborted", "req/s", "out tok/s", "TTFT p50/p99 ms", "TPOT p50/p99 ms",
                "SLO ok"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["mode"], str(r["request_rate"]), f"{r['completed']}/{r['failed']}/{r['aborted']}",
                      f"{r['request_throughput']:.2f}", f"{r['output_throughput']:.1f}",
                      f"{r['median_ttft_ms']:.0f}/{r['p99_ttft_ms']:.0f}", f"{r['median_tpot_ms']:.1f}/{r['p99_tpot_ms']:.1f}",
                      f"{r['slo_attainment']:.0%}" if "slo_attainment" in r else "-")
    err.print(table)
    if b.slos and len(b.rates) > 1:
        for m in modes or ["endpoint"]:
            best = max_rate_meeting([r for r in rows if r["mode"] == m])
            err.print(f"{m}: highest rate with >= 90% SLO attainment: {best if best is not None else 'none'}")
