"""Overload and drain of a `pdcli serve` subprocess (tiny model, CPU, loopback, bounded): past --max-waiting a
burst's excess gets 429 with Retry-After at once while the rest completes; SIGTERM stops taking requests (503),
lets the streams in flight finish and exits 0 within --drain-timeout."""
import asyncio
import signal
import subprocess
import sys
import time

import httpx
import pytest

from test_serve import free_port, kv_free, metric

MAX_WAITING = 4


def start_server(path: str, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pdcli", "serve", "--model", path, "--port", str(port),
                             "--served-model-name", "tiny", "--num-kv-blocks", "4096", "--block-size", "8",
                             "--max-model-len", "1024", *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.3)
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read()}")
    proc.kill()
    pytest.fail("server did not start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


async def post(client: httpx.AsyncClient, base: str, i: int, max_tokens: int):
    began = time.monotonic()
    r = await client.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": f"burst {i} " * 20,
                                                          "max_tokens": max_tokens, "ignore_eos": True})
    return r.status_code, r.headers.get("retry-after"), r.json(), time.monotonic() - began


def test_a_burst_past_max_waiting_gets_429_at_once_and_the_rest_completes(tiny_model_dir):
    proc, base = start_server(tiny_model_dir("llama-gqa"), "--max-waiting", str(MAX_WAITING))
    try:
        async def burst():
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=50)) as client:
                return await asyncio.wait_for(asyncio.gather(*(post(client, base, i, 64)
                                                               for i in range(3 * MAX_WAITING))), 90)

        results = asyncio.run(burst())
        ok = [r for r in results if r[0] == 200]
        refused = [r for r in results if r[0] == 429]
        assert len(ok) + len(refused) == 3 * MAX_WAITING  # nothing lost, nothing else
        assert len(ok) >= MAX_WAITING and refused
        assert all(r[2]["usage"]["completion_tokens"] == 64 for r in ok)
        assert all(r[1] == "1" and r[2]["error"]["code"] == "server_overloaded" for r in refused)
        assert max(r[3] for r in refused) < min(r[3] for r in ok)  # refused at once
        assert metric(base, "pdcli_requests_rejected_total") == len(refused)
        free, total = kv_free(base)
        assert free == total > 0
        again = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert again.status_code == 200
    finally:
        stop(proc)


async def stream(client: httpx.AsyncClient, base: str, i: int, started: set) -> tuple[str, int]:
    body = {"model": "tiny", "prompt": f"drain {i}", "max_tokens": 600, "ignore_eos": True, "stream": True,
            "temperature": 0, "stream_options": {"include_usage": True}}
    tokens = 0
    async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith('data: {"id"'):
                started.add(i)
                if '"usage"' in line:
                    tokens = int(line.split('"completion_tokens": ')[1].split(",")[0])
            if line == "data: [DONE]":
                return "done", tokens
    return "cut", tokens


def test_sigterm_drains_streams_refuses_new_requests_and_exits_0(tiny_model_dir):
    drain_timeout = 60
    proc, base = start_server(tiny_model_dir("llama-gqa"), "--drain-timeout", str(drain_timeout))

    async def run():
        started: set = set()
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=50)) as client:
            tasks = [asyncio.create_task(stream(client, base, i, started)) for i in range(20)]
            while len(started) < 20:
                assert not any(t.done() for t in tasks)
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            began = time.monotonic()
            await asyncio.sleep(0.1)
            new = await client.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
            health = await client.get(f"{base}/health")
            results = await asyncio.wait_for(asyncio.gather(*tasks), drain_timeout)
            return new, health, results, began

    try:
        new, health, results, began = asyncio.run(run())
        assert new.status_code == 503 and new.json()["error"]["code"] == "server_draining"
        assert health.status_code == 503 and health.json() == {"status": "draining"}
        assert results == [("done", 600)] * 20
        assert proc.wait(drain_timeout) == 0
        assert time.monotonic() - began < drain_timeout
    finally:
        stop(proc)


def test_the_bench_counts_refused_requests_as_failed_with_their_reason():
    from pdcli.bench.http_client import http_error
    from pdcli.bench.metrics import RequestRecord, summarize

    body = '{"error": {"message": "the server is overloaded", "type": "rate_limit_error", "code": "server_overloaded"}}'
    recs = [RequestRecord(arrival=0.0, input_len=4, error=http_error(429, body)),
            RequestRecord(arrival=0.0, input_len=4, error=http_error(503, "<html>")),
            RequestRecord(arrival=0.0, input_len=4, first_token=0.1, end=0.2, output_len=1, token_times=[0.1])]
    s = summarize(recs)
    assert s["failed"] == 2 and s["completed"] == 1
    assert s["failure_reasons"] == {"HTTP 429 server_overloaded": 1, "HTTP 503": 1}
