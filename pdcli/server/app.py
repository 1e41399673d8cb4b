"""The OpenAI-compatible HTTP app over a CentralScheduler: completions, chat, models, health, metrics.
Responses, streaming or not, come from one generator of per-choice deltas (server/generation.py)."""
from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from pdcli.inputs import PromptError, check_token_ids
from pdcli.server.generation import Generation
from pdcli.server.metrics import ServerMetrics
from pdcli.server.protocol import APIError, chat_prompt, check_parameters, completion_prompts, flag, sampling_params

RETRY_AFTER_S = 1  # what an overloaded or draining server tells clients to wait


class OpenAIServer:
    """What the routes share: the coordinator, the served model's name and limits, the key, the metrics."""

    def __init__(self, cs, model_root: str, served_model_name: str, max_model_len: int, api_key: str | None):
        self.cs, self.model_root, self.name, self.max_model_len = cs, model_root, served_model_name, max_model_len
        self.api_key, self.metrics = api_key, ServerMetrics()
        self.draining = False  # SIGTERM: new requests get 503 while those in flight finish (server/drain.py)

    def error(self, e: APIError, endpoint: str) -> JSONResponse:
        self.metrics.request(endpoint, e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def refuse_if_draining(self) -> None:
        if self.draining:
            self.metrics.rejected["draining"] += 1
            raise APIError("the server is shutting down and takes no new requests", 503, code="server_draining",
                           type_="service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})

    def start(self, gen: Generation) -> None:
        """Submit the generation's prompts now; 429 with Retry-After when too many requests wait already."""
        from pdcli.coordinator.central import Overloaded

        try:
            gen.start()
        except Overloaded as e:
            self.metrics.rejected["overloaded"] += 1
            raise APIError(str(e), 429, code="server_overloaded", type_="rate_limit_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    def check(self, request: Request, body: dict | None = None) -> None:
        given = request.headers.get("authorization") or ""
        if self.api_key is not None and not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError("Invalid API key: pass 'Authorization: Bearer <key>'", 401, code="invalid_api_key")
        if body is not None and body.get("model", self.name) != self.name:
            raise APIError(f"The model '{body.get('model')}' does not exist; this server serves "
                           f"'{self.name}'", 404, param="model", code="model_not_found")

    @staticmethod
    async def parse(request: Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            raise APIError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object")
        return body

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "pdcli", "root": self.model_root, "parent": None,
                                            "max_model_len": self.max_model_len}]}

    def generation(self, body: dict, chat: bool) -> tuple[Generation, bool, dict]:
        """The request's prompts x n choices, whether to stream, the stream options; APIError on bad input."""
        check_parameters(body, chat)
        tok = self.cs.tokenizer
        prompts = [chat_prompt(body, tok)] if chat else completion_prompts(body, tok)
        try:
            for p in prompts:
                check_token_ids(p, self.cs.vocab_size)
        except PromptError as e:
            raise APIError(str(e), param="prompt") from None
        params = [sampling_params(body, len(p), self.max_model_len, self.cs.vocab_size, chat) for p in prompts]
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError("'stream' must be a boolean", param="stream")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise APIError("'stream_options' must be an object", param="stream_options")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        echo = not chat and flag(body, "echo")
        return Generation(self.cs, rid, prompts, params, chat, self.name, self.metrics, echo), stream, opts

    async def handle(self, request: Request, endpoint: str, chat: bool):
        try:
            self.refuse_if_draining()
            body = await self.parse(request)
            self.check(request, body)
            gen, stream, opts = self.generation(body, chat)
            self.start(gen)
        except APIError as e:
            return self.error(e, endpoint)
        if stream:
            self.metrics.request(endpoint, 200)
            return StreamingResponse(gen.sse(request, bool(opts.get("include_usage"))), media_type="text/event-stream")
        result = await gen.collect(request)
        status = 500 if result.get("error") else 200
        self.metrics.request(endpoint, status)
        return JSONResponse(result, status_code=status)


def create_app(cs, model_root: str, served_model_name: str, max_model_len: int, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="pdcli", docs_url=None, redoc_url=None)
    server = OpenAIServer(cs, model_root, served_model_name, max_model_len, api_key)
    app.state.cs, app.state.metrics, app.state.server = cs, server.metrics, server

    @app.get("/health")
    async def health():
        if server.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            server.check(request)
        except APIError as e:
            return server.error(e, "/v1/models")
        return server.models()

    @app.get("/metrics")
    async def prometheus():
        stats = await asyncio.to_thread(cs.worker_stats)
        text = server.metrics.render(stats, cs.accounting, len(cs.waiting), server.draining)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.handle(request, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.handle(request, "/v1/chat/completions", chat=True)

    return app
