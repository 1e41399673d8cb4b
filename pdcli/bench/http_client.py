"""The same open-loop load against any OpenAI-compatible server (`--endpoint`), streaming completions."""
from __future__ import annotations

import asyncio
import json
import time
import urllib.request

from pdcli.bench.metrics import RequestRecord
from pdcli.bench.workloads import BenchRequest


async def _one(session, url: str, model: str, req: BenchRequest, at: float, start: float, headers: dict,
               slots: asyncio.Semaphore | None) -> RequestRecord:
    await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
    if slots is None:
        return await _send(session, url, model, req, at, start, headers)
    async with slots:  # vLLM's --max-concurrency: timed from when a slot frees
        return await _send(session, url, model, req, time.perf_counter() - start, start, headers)


async def _send(session, url: str, model: str, req: BenchRequest, at: float, start: float, headers: dict) -> RequestRecord:
    rec = RequestRecord(arrival=at, input_len=len(req.prompt_ids))
    body = {"model": model, "prompt": req.prompt_ids, "max_tokens": req.output_len, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    try:
        async with session.post(f"{url}/v1/completions", json=body, headers=headers) as r:
            if r.status != 200:  # 429 (overloaded) and 503 (draining) fail with their reason
                rec.error = http_error(r.status, await r.text())
                return rec
            async for line in r.content:  # one SSE line at a time
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                now = time.perf_counter() - start
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    rec.error = chunk["error"].get("message", "error")
                elif chunk.get("choices"):  # a chunk per step that made tokens, its text possibly held back
                    rec.first_token = rec.first_token if rec.first_token is not None else now  # (vLLM's rule)
                    rec.token_times.append(now)
                if chunk.get("usage"):
                    rec.output_len = chunk["usage"]["completion_tokens"]
        rec.end = time.perf_counter() - start
        rec.output_len = rec.output_len or len(rec.token_times)
        if rec.first_token is None and rec.error is None:
            rec.error = "no tokens"
    except Exception as e:  # connection refused, reset, timeout: the request failed, it is not dropped
        rec.error = f"{type(e).__name__}: {e}"
    return rec


def http_error(status: int, text: str) -> str:
    """'HTTP <status> <OpenAI error code>: <message>' (the part before ':' is the failure's reason)."""
    try:
        err = json.loads(text)["error"]
        return f"HTTP {status} {err.get('code') or err.get('type') or ''}".rstrip() + f": {err.get('message', '')[:200]}"
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"HTTP {status}: {text[:200]}"


async def _run(url, model, requests, arrivals, api_key, timeout, max_concurrency):
    import aiohttp

    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # aiohttp, as vLLM's benchmark client: its C parser keeps up with thousands of SSE chunks a second
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout),
                                     connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                     read_bufsize=2**20) as session:
        start = time.perf_counter()
        return await asyncio.gather(*(_one(session, url, model, r, a, start, headers, slots)
                                      for r, a in zip(requests, arrivals)))


def served_model(url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/models", headers=headers), timeout=30) as r:
        return json.load(r)["data"][0]["id"]


def event_loop():
    """uvloop's loop where installed (as uvicorn uses), else asyncio's."""
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def run_endpoint(url: str, requests: list[BenchRequest], arrivals, api_key: str | None = None,
                 model: str | None = None, timeout: float = 600.0,
                 max_concurrency: int | None = None) -> list[RequestRecord]:
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    model = model or served_model(url, api_key)
    with asyncio.Runner(loop_factory=event_loop) as runner:
        return list(runner.run(_run(url, model, requests, arrivals, api_key, timeout, max_concurrency)))
