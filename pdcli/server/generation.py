"""One HTTP request's generation: its prompts x n choices submitted to the coordinator, and their text as
deltas, folded into one response or streamed as server-sent events."""
from __future__ import annotations

import asyncio
import json
import time

from fastapi import Request

from pdcli.coordinator.output import TextStream
from pdcli.server.protocol import APIError

DISCONNECT_POLL_S = 0.25  # how often a streaming request asks whether its client is still there


class Generation:
    def __init__(self, cs, rid, prompts, params, chat, model, metrics):
        self.cs, self.rid, self.prompts, self.params, self.chat = cs, rid, prompts, params, chat
        self.model, self.metrics, self.created = model, metrics, int(time.time())

    def _submit(self, loop: asyncio.AbstractEventLoop, wake: asyncio.Event) -> list:
        tracked = []
        for p, sp in zip(self.prompts, self.params):
            t = self.cs.submit(p, sp, request_id=f"{self.rid}-{len(tracked)}")
            t.waker = lambda: loop.call_soon_threadsafe(wake.set)
            tracked.append(t)
        return tracked

    def _arrived(self, tracked: list, streams: dict):
        """(choice index, new text, finish reason | None) of the tokens that arrived since the last call."""
        for k, t in enumerate(tracked):
            n = max(1, t.params.n)
            arrived = {}  # completion index -> [made tokens, finish reason]
            while not t.events.empty():
                idx, ids, reason = t.events.get_nowait()
                a = arrived.setdefault(idx, [False, None])
                a[0] = a[0] or bool(ids)
                a[1] = reason if reason is not None else a[1]
            for idx, (made, reason) in arrived.items():
                stream = streams.setdefault(k * n + idx, TextStream(self.cs.tokenizer, t.params.stop))
                visible = self.cs.outputs.visible(t, idx, reason)
                new = stream.update(visible, None if reason is None else self.cs.outputs.text(t, visible))
                if new or made or reason is not None:
                    yield k * n + idx, new, reason

    async def deltas(self, request: Request):
        """Yields (choice index, new text, finish reason | None) whenever tokens arrive, with new text "" while
        it is held back (an incomplete character, a possible stop string), as vLLM streams; the tokens that
        arrived since the last yield go in one delta (a server behind its engine sends fewer, larger chunks).
        Aborts everything if the client leaves."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        tracked = self._submit(loop, wake)
        streams: dict[int, TextStream] = {}
        checked = loop.time()
        try:
            while True:
                for delta in self._arrived(tracked, streams):
                    yield delta
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
        count = len(self.prompts) * max(1, self.params[0].n)
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
                "model": self.model, "choices": [self._choice(i, texts.get(i, ""), reasons.get(i)) for i in range(count)],
                "usage": self.usage()}

    async def sse(self, request: Request, include_usage: bool):
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        head = json.dumps({"id": self.rid, "object": obj, "created": self.created, "model": self.model})[:-1]
        if self.chat:
            n = len(self.prompts) * max(1, self.params[0].n)
            roles = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                     for i in range(n)]
            yield f"data: {head}, {json.dumps({'choices': roles})[1:]}\n\n"
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
            yield f"data: {head}, {json.dumps({'choices': [], 'usage': self.usage()})[1:]}\n\n"
        yield "data: [DONE]\n\n"
