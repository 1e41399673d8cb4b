"""The OpenAI-compatible HTTP app over a CentralScheduler. Streaming and non-streaming responses come
from one generator of per-choice deltas."""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from pdcli.server.metrics import ServerMetrics
from pdcli.server.protocol import APIError, chat_prompt, completion_prompts, sampling_params


def create_app(cs, model_root: str, served_model_name: str, max_model_len: int, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="pdcli", docs_url=None, redoc_url=None)
    metrics = ServerMetrics()
    app.state.cs, app.state.metrics = cs, metrics
    tok = cs.tokenizer

    def error(e: APIError, endpoint: str) -> JSONResponse:
        metrics.request(endpoint, e.status)
        return JSONResponse(e.body(), status_code=e.status)

    def check(request: Request, body: dict | None = None) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError("Invalid API key: pass 'Authorization: Bearer <key>'", 401, code="invalid_api_key")
        if body is not None and body.get("model", served_model_name) != served_model_name:
            raise APIError(f"The model '{body.get('model')}' does not exist; this server serves "
                           f"'{served_model_name}'", 404, param="model", code="model_not_found")

    async def parse(request: Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            raise APIError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object")
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            check(request)
        except APIError as e:
            return error(e, "/v1/models")
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "pdcli", "root": model_root, "parent": None,
                                            "max_model_len": max_model_len}]}

    @app.get("/metrics")
    async def prometheus():
        stats = await asyncio.to_thread(cs.worker_stats)
        return PlainTextResponse(metrics.render(stats, cs.accounting), media_type="text/plain; version=0.0.4")

    async def handle(request: Request, endpoint: str, chat: bool):
        try:
            body = await parse(request)
            check(request, body)
            prompts = [chat_prompt(body, tok)] if chat else completion_prompts(body, tok)
            bad = next((t for p in prompts for t in p if not 0 <= t < cs.vocab_size), None)
            if bad is not None:
                raise APIError(f"token id {bad} is outside the vocabulary", param="prompt")
            params = [sampling_params(body, len(p), max_model_len) for p in prompts]
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise APIError("'stream' must be a boolean", param="stream")
            opts = body.get("stream_options") or {}
            if not isinstance(opts, dict):
                raise APIError("'stream_options' must be an object", param="stream_options")
        except APIError as e:
            return error(e, endpoint)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        gen = Generation(cs, rid, prompts, params, chat, served_model_name, metrics)
        if stream:
            metrics.request(endpoint, 200)
            return StreamingResponse(gen.sse(request, bool(opts.get("include_usage"))), media_type="text/event-stream")
        result = await gen.collect(request)
        status = 500 if result.get("error") else 200
        metrics.request(endpoint, status)
        return JSONResponse(result, status_code=status)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, "/v1/chat/completions", chat=True)

    return app


DISCONNECT_POLL_S = 0.25  # how often a streaming request asks whether its client is still there


class TextStream:
    """One choice's text as it streams: new tokens are decoded in a short window (vLLM's prefix and read
    offsets: O(1) per token), the whole output once at the end (cut at a stop string), so the deltas add up
    to the non-streaming text."""

    def __init__(self):
        self.prefix = self.read = 0  # token offsets of the decode window
        self.text = ""  # decoded so far
        self.sent = ""  # streamed so far

    def update(self, cs, t, ids: list[int], reason: str | None) -> str:
        if reason is not None:
            text = cs.text(t, ids, reason)
        else:
            before = cs.tokenizer.decode(ids[self.prefix:self.read])
            window = cs.tokenizer.decode(ids[self.prefix:])
            if len(window) > len(before) and not window.endswith("\ufffd"):  # whole characters only
                self.text += window[len(before):]
                self.prefix, self.read = self.read, len(ids)
            text = self.text
            if t.params.stop:  # hold back what may start a stop string
                hold = max(map(len, t.params.stop)) - 1
                text = text[:max(len(self.sent), len(text) - hold)]
        new = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent = text
        return new


class Generation:
    """One HTTP request: its prompts x n choices, as deltas."""

    def __init__(self, cs, rid, prompts, params, chat, model, metrics):
        self.cs, self.rid, self.prompts, self.params, self.chat = cs, rid, prompts, params, chat
        self.model, self.metrics, self.created = model, metrics, int(time.time())

    async def deltas(self, request: Request):
        """Yields (choice index, new text, finish reason | None) whenever tokens arrive, with new text "" while
        it is held back (an incomplete character, a possible stop string), as vLLM streams; the tokens that
        arrived since the last yield go in one delta (a server behind its engine sends fewer, larger chunks).
        Aborts everything if the client leaves."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        tracked = []
        for p, sp in zip(self.prompts, self.params):
            t = self.cs.submit(p, sp, request_id=f"{self.rid}-{len(tracked)}")
            t.waker = lambda: loop.call_soon_threadsafe(wake.set)
            tracked.append(t)
        streams: dict[int, TextStream] = {}
        checked = loop.time()
        try:
            while True:
                for k, t in enumerate(tracked):
                    n = max(1, t.params.n)
                    arrived = {}  # completion index -> [made tokens, finish reason]
                    while not t.events.empty():
                        idx, ids, reason = t.events.get_nowait()
                        a = arrived.setdefault(idx, [False, None])
                        a[0] = a[0] or bool(ids)
                        a[1] = reason if reason is not None else a[1]
                    for idx, (made, reason) in arrived.items():
                        stream = streams.setdefault(k * n + idx, TextStream())
                        new = stream.update(self.cs, t, self._visible(t, idx, reason), reason)
                        if new or made or reason is not None:
                            yield k * n + idx, new, reason
                if all(t.done.is_set() and t.events.empty() for t in tracked):
                    break
                if loop.time() - checked > DISCONNECT_POLL_S:  # a receive() per token step would cost more
                    checked = loop.time()
                    if await request.is_disconnected():
                        return
                wake.clear()
                if not any(not t.events.empty() for t in tracked):
                    try:
                        async with asyncio.timeout(DISCONNECT_POLL_S):  # no task per wait, unlike wait_for on 3.11
                            await wake.wait()
                    except TimeoutError:
                        pass
        finally:
            for t in tracked:
                if not t.done.is_set():
                    self.cs.abort(t.rid, "client disconnected")
                else:
                    self.metrics.finished(self.cs.output(t))
            self.tracked = tracked

    def _visible(self, t, idx, reason):
        ids = t.tokens.get(idx, [])
        eos = self.cs.tokenizer.eos_token_ids
        return ids[:-1] if reason == "stop" and ids and (ids[-1] in eos or ids[-1] in t.params.stop_token_ids) else ids

    def usage(self) -> dict:
        prompt = sum(len(t.prompt_ids) for t in self.tracked)
        completion = sum(len(v) for t in self.tracked for v in t.tokens.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _choice(self, index: int, text: str, reason) -> dict:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": reason}
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}

    async def collect(self, request: Request) -> dict:
        texts, reasons = {}, {}
        async for choice, new, reason in self.deltas(request):
            texts[choice] = texts.get(choice, "") + new
            if reason is not None:
                reasons[choice] = reason
        errors = [t.error for t in self.tracked if t.error]
        if errors:
            return APIError(f"generation failed: {errors[0]}", 500, type_="server_error").body()
        n = max(1, self.params[0].n)
        count = len(self.prompts) * n
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
                "model": self.model, "choices": [self._choice(i, texts.get(i, ""), reasons.get(i)) for i in range(count)],
                "usage": self.usage()}

    async def sse(self, request: Request, include_usage: bool):
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        head = json.dumps({"id": self.rid, "object": obj, "created": self.created, "model": self.model})[:-1]

        def chunk(choices: list, **extra) -> str:
            return f"data: {head}, {json.dumps({'choices': choices, **extra})[1:]}\n\n"

        if self.chat:
            n = len(self.prompts) * max(1, self.params[0].n)
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(n)])
        async for choice, new, reason in self.deltas(request):
            # the per-token chunk, formatted directly (json.dumps of the whole dict each time costs more)
            if self.chat:
                delta = f'{{"content": {json.dumps(new)}}}' if new else "{}"
                body = f'{{"index": {choice}, "delta": {delta}, "logprobs": null, "finish_reason": {json.dumps(reason)}}}'
            else:
                body = f'{{"index": {choice}, "text": {json.dumps(new)}, "logprobs": null, "finish_reason": {json.dumps(reason)}}}'
            yield f'data: {head}, "choices": [{body}]}}\n\n'
        errors = [t.error for t in self.tracked if t.error and t.finish.get(0) != "abort"]
        if errors:
            yield f"data: {json.dumps(APIError(f'generation failed: {errors[0]}', 500, type_='server_error').body())}\n\n"
        if include_usage:
            yield chunk([], usage=self.usage())
        yield "data: [DONE]\n\n"
