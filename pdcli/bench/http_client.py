"""The same open-loop load against any OpenAI-compatible server (`--endpoint`), streaming completions."""
from __future__ import annotations

import asyncio
import json
import time

from pdcli.bench.metrics import RequestRecord
from pdcli.bench.workloads import BenchRequest


async def _one(client, url: str, model: str, req: BenchRequest, at: float, start: float, headers: dict,
               slots: asyncio.Semaphore | None) -> RequestRecord:
    await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
    if slots is None:
        return await _send(client, url, model, req, at, start, headers)
    async with slots:  # vLLM's --max-concurrency: timed from when a slot frees
        return await _send(client, url, model, req, time.perf_counter() - start, start, headers)


async def _send(client, url: str, model: str, req: BenchRequest, at: float, start: float, headers: dict) -> RequestRecord:
    rec = RequestRecord(arrival=at, input_len=len(req.prompt_ids))
    body = {"model": model, "prompt": req.prompt_ids, "max_tokens": req.output_len, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
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


async def _run(url, model, requests, arrivals, api_key, timeout, max_concurrency):
    import httpx

    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(10, len(requests)), max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        return await asyncio.gather(*(_one(client, url, model, r, a, start, headers, slots)
                                      for r, a in zip(requests, arrivals)))


def served_model(url: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def run_endpoint(url: str, requests: list[BenchRequest], arrivals, api_key: str | None = None,
                 model: str | None = None, timeout: float = 600.0,
                 max_concurrency: int | None = None) -> list[RequestRecord]:
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    model = model or served_model(url, api_key)
    return list(asyncio.run(_run(url, model, requests, arrivals, api_key, timeout, max_concurrency)))
