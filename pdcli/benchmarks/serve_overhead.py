"""HTTP overhead of `pdcli serve`: the same open-loop load (seeded arrivals, same requests) in-process
through the coordinator and over HTTP streaming against a `pdcli serve` subprocess on 127.0.0.1.
Writes results/serve_overhead_<device>.json.

    python -m pdcli.benchmarks.serve_overhead --model dummy:llama3-8b --device cuda:0 --rate 8 --duration 120
"""
from __future__ import annotations

import argparse
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter

import torch

from pdcli.benchmarks.device import device_slug
from pdcli.benchmarks.results import provenance, write

KEYS = ("completed", "failed", "aborted", "request_throughput", "output_throughput", "mean_ttft_ms", "p99_ttft_ms",
        "mean_tpot_ms", "p99_tpot_ms", "duration")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_log(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()


def start_server(model: str, device: str, engine: dict, startup_timeout: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in engine.items()]
    log = tempfile.TemporaryFile("w+")  # a pipe nobody reads would block the server once full
    proc = subprocess.Popen([sys.executable, "-m", "pdcli", "serve", "--model", model, "--collocated", device,
                             "--port", str(port), *flags], stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log = log
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pdcli serve exited: {server_log(proc)[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=1) as r:
                if r.status == 200:
                    return proc, base
        except OSError:  # not listening yet (URLError is an OSError)
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"pdcli serve did not start in {startup_timeout:.0f} s")


def parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dummy:llama3-8b")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rate", type=float, default=8.0, help="requests/s (Poisson)")
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of arrivals")
    ap.add_argument("--workload", default="random")
    ap.add_argument("--random-input-len", type=int, default=512)
    ap.add_argument("--random-output-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--num-kv-blocks", type=int, default=None)
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    ap.add_argument("--out", default="results")
    return ap.parse_args(argv)


def run_inproc(args: argparse.Namespace, engine: dict, n: int, drain: float) -> tuple[list, list[float], dict]:
    """The load through an in-process coordinator: (its requests, their arrival times, the summary)."""
    from pdcli.bench.arrivals import arrival_times
    from pdcli.bench.metrics import summarize
    from pdcli.bench.runner import run_load
    from pdcli.bench.workloads import make_requests
    from pdcli.coordinator.central import CentralScheduler
    from pdcli.workers.layout import parse_layout

    with CentralScheduler(args.model, parse_layout(args.device), **engine) as cs:
        reqs = make_requests(args.workload, n, args.seed, cs.vocab_size, args.max_model_len, args.random_input_len,
                             args.random_output_len)
        arrivals = arrival_times(n, args.rate, 1.0, args.seed)
        t0 = time.monotonic()
        inproc = summarize(run_load(cs, reqs, arrivals, "collocated", drain))
        print(f"in-process: {inproc['output_throughput']:.0f} out tok/s, {inproc['failed']} failed "
              f"({time.monotonic() - t0:.0f} s)", flush=True)
    return reqs, arrivals, inproc


def run_http(args: argparse.Namespace, engine: dict, reqs: list, arrivals: list[float],
             drain: float) -> tuple[dict, list[tuple[str, int]]]:
    """The same load over HTTP against a `pdcli serve` subprocess: (the summary, its 5 commonest errors)."""
    from pdcli.bench.http_client import run_endpoint
    from pdcli.bench.metrics import summarize

    proc, base = start_server(args.model, args.device, engine, args.startup_timeout)
    try:
        t0 = time.monotonic()
        records = run_endpoint(base, reqs, arrivals, timeout=drain)
        http = summarize(records)
        errors = Counter(r.error for r in records if r.error).most_common(5)
        print(f"http:       {http['output_throughput']:.0f} out tok/s, {http['failed']} failed "
              f"({time.monotonic() - t0:.0f} s)" + "".join(f"\n  {n} x {e}" for e, n in errors), flush=True)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return http, errors


def result(args: argparse.Namespace, argv, engine: dict, n: int, inproc: dict, http: dict,
           errors: list[tuple[str, int]], overhead: float | None) -> dict:
    """The JSON: both runs' summaries side by side, with the HTTP overhead (1 - http / in-process output tok/s)."""
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    return dict(summary=dict(device=device, model=args.model, request_rate=args.rate, duration_s=args.duration,
                             num_prompts=n, inproc_output_throughput=inproc["output_throughput"],
                             http_output_throughput=http["output_throughput"], http_overhead=overhead,
                             inproc_failed=inproc["failed"], http_failed=http["failed"],
                             http_errors=[dict(error=e, count=n) for e, n in errors]),
                inproc={k: inproc[k] for k in KEYS if k in inproc}, http={k: http[k] for k in KEYS if k in http},
                provenance=provenance("pdcli.benchmarks.serve_overhead", argv, workload=args.workload,
                                      input_len=args.random_input_len, output_len=args.random_output_len,
                                      seed=args.seed, engine=engine))


def main(argv=None) -> int:
    args = parse_args(argv)
    engine = dict(max_model_len=args.max_model_len)
    if args.num_kv_blocks is not None:
        engine["num_kv_blocks"] = args.num_kv_blocks
    n = max(1, int(args.rate * args.duration))
    drain = args.duration + 600.0
    reqs, arrivals, inproc = run_inproc(args, engine, n, drain)
    http, errors = run_http(args, engine, reqs, arrivals, drain)
    overhead = 1.0 - http["output_throughput"] / inproc["output_throughput"] if inproc["output_throughput"] else None
    res = result(args, argv, engine, n, inproc, http, errors, overhead)
    print(f"HTTP overhead: {overhead:.1%}" if overhead is not None else "HTTP overhead: n/a")
    path = write(args.out, f"serve_overhead_{device_slug() if args.device.startswith('cuda') else 'cpu'}", res)
    print(f"wrote {path}")
    return 0 if http["failed"] == 0 and inproc["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
