"""One HTTP request's generation: its prompts x n choices submitted to the coordinator, and their text (and
log-probabilities, when asked) as deltas, folded into one response or streamed as server-sent events."""
from __future__ import annotations

import asyncio
import json
import time

from fastapi import Request

from pdcli.coordinator.output import TextStream
from pdcli.server.protocol import APIError

DISCONNECT_POLL_S = 0.25  # how often a streaming request asks whether its client is still there


class Logprobs:
    """One choice's log-probabilities in OpenAI's shapes: completions' {tokens, token_logprobs, top_logprobs,
    text_offset} or chat's {content: [{token, logprob, bytes, top_logprobs}]}."""

    def __init__(self, tokenizer, chat: bool, offset: int = 0):
        self.tokenizer, self.chat, self.offset = tokenizer, chat, offset
        self.sent = 0  # visible tokens whose log-probabilities went out

    def _token(self, tid: int) -> str:
        return self.tokenizer.decode([tid])

    def new(self, visible: list[int], logprobs: list) -> dict | None:
        """The entries of the visible tokens not sent yet (those whose log-probabilities have arrived)."""
        pairs = list(zip(visible[self.sent:], logprobs[self.sent:len(visible)]))
        self.sent += len(pairs)
        if not pairs:
            return None
        if self.chat:
            return {"content": [self._chat_entry(t, lp) for t, lp in pairs]}
        tokens = [self._token(t) for t, _ in pairs]
        offsets = []
        for s in tokens:
            offsets.append(self.offset)
            self.offset += len(s)
        tops = [{**{self._token(i): v for i, v in zip(lp.top_ids, lp.top_logprobs)}, tok: lp.logprob}
                for tok, (_, lp) in zip(tokens, pairs)]
        return {"tokens": tokens, "token_logprobs": [lp.logprob for _, lp in pairs], "top_logprobs": tops,
                "text_offset": offsets}

    def _chat_entry(self, tid: int, lp) -> dict:
        s = self._token(tid)
        tops = [{"token": (x := self._token(i)), "logprob": v, "bytes": list(x.encode())}
                for i, v in zip(lp.top_ids, lp.top_logprobs)]
        return {"token": s, "logprob": lp.logprob, "bytes": list(s.encode()), "top_logprobs": tops}

    @staticmethod
    def merge(a: dict | None, b: dict | None) -> dict | None:
        if a is None or b is None:
            return a or b
        return {k: a[k] + b[k] for k in a}


class Generation:
    def __init__(self, cs, rid, prompts, params, chat, model, metrics, echo: bool = False):
        self.cs, self.rid, self.prompts, self.params, self.chat = cs, rid, prompts, params, chat
        self.model, self.metrics, self.created, self.echo = model, metrics, int(time.time()), echo
        self.tracked: list = []
        self.wake: asyncio.Event | None = None

    def start(self) -> None:
        """Submit every prompt now (on the event loop), so an overloaded coordinator refuses before a response
        starts; raises coordinator.central.Overloaded."""
        loop = asyncio.get_running_loop()
        self.wake = wake = asyncio.Event()
        rids = [f"{self.rid}-{k}" for k in range(len(self.prompts))]
        self.tracked = self.cs.submit_all(self.prompts, self.params, rids)
        for t in self.tracked:
            t.waker = lambda: loop.call_soon_threadsafe(wake.set)

    def _choice_state(self, states: dict, choice: int, t, k: int) -> tuple:
        if choice not in states:
            prefix = self.cs.tokenizer.decode(self.prompts[k]) if self.echo else ""
            lps = Logprobs(self.cs.tokenizer, self.chat, len(prefix)) if t.params.logprobs is not None else None
            states[choice] = (TextStream(self.cs.tokenizer, t.params.stop), lps, [prefix])
        return states[choice]

    def _arrived(self, states: dict):
        """(choice index, new text, finish reason | None, logprobs | None) of the tokens that arrived since the
        last call; an echoed prompt leads its choice's first delta."""
        for k, t in enumerate(self.tracked):
            n = max(1, t.params.n)
            arrived = {}  # completion index -> [made tokens, finish reason]
            while not t.events.empty():
                idx, ids, reason = t.events.get_nowait()
                a = arrived.setdefault(idx, [False, None])
                a[0] = a[0] or bool(ids)
                a[1] = reason if reason is not None else a[1]
            for idx, (made, reason) in arrived.items():
                stream, lps, prefix = self._choice_state(states, k * n + idx, t, k)
                visible = self.cs.outputs.visible(t, idx, reason)
                new = stream.update(visible, None if reason is None else self.cs.outputs.text(t, visible))
                new_lps = lps.new(visible, t.logprobs.get(idx, [])) if lps is not None else None
                if prefix[0]:
                    new, prefix[0] = prefix[0] + new, ""
                if new or made or reason is not None:
                    yield k * n + idx, new, reason, new_lps

    async def deltas(self, request: Request):
        """Yields (choice index, new text, finish reason | None, logprobs | None) whenever tokens arrive, with new
        text "" while it is held back (an incomplete character, a possible stop string), as vLLM streams; the
        tokens that arrived since the last yield go in one delta (a server behind its engine sends fewer, larger
        chunks). Aborts everything if the client leaves."""
        loop = asyncio.get_running_loop()
        tracked, wake = self.tracked, self.wake
        states: dict = {}
        checked = loop.time()
        try:
            while True:
                for delta in self._arrived(states):
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

    def usage(self) -> dict:
        prompt = sum(len(t.prompt_ids) for t in self.tracked)
        completion = sum(len(v) for t in self.tracked for v in t.tokens.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _choice(self, index: int, text: str, reason, logprobs) -> dict:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": reason}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    async def collect(self, request: Request) -> dict:
        texts, reasons, lps = {}, {}, {}
        async for choice, new, reason, new_lps in self.deltas(request):
            texts[choice] = texts.get(choice, "") + new
            lps[choice] = Logprobs.merge(lps.get(choice), new_lps)
            if reason is not None:
                reasons[choice] = reason
        errors = [t.error for t in self.tracked if t.error]
        if errors:
            return APIError(f"generation failed: {errors[0]}", 500, type_="server_error").body()
        count = len(self.prompts) * max(1, self.params[0].n)
        choices = [self._choice(i, texts.get(i, ""), reasons.get(i), lps.get(i)) for i in range(count)]
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}

    def _chunk(self, choice: int, new: str, reason, lps) -> str:
        """One choice's per-token chunk body, formatted directly (json.dumps of the whole dict costs more)."""
        logprobs = "null" if lps is None else json.dumps(lps)
        if self.chat:
            delta = f'{{"content": {json.dumps(new)}}}' if new else "{}"
            return f'{{"index": {choice}, "delta": {delta}, "logprobs": {logprobs}, "finish_reason": {json.dumps(reason)}}}'
        return f'{{"index": {choice}, "text": {json.dumps(new)}, "logprobs": {logprobs}, "finish_reason": {json.dumps(reason)}}}'

    async def sse(self, request: Request, include_usage: bool):
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        head = json.dumps({"id": self.rid, "object": obj, "created": self.created, "model": self.model})[:-1]
        if self.chat:
            n = len(self.prompts) * max(1, self.params[0].n)
            roles = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                     for i in range(n)]
            yield f"data: {head}, {json.dumps({'choices': roles})[1:]}\n\n"
        async for choice, new, reason, lps in self.deltas(request):
            yield f'data: {head}, "choices": [{self._chunk(choice, new, reason, lps)}]}}\n\n'
        errors = [t.error for t in self.tracked if t.error and t.finish.get(0) != "abort"]
        if errors:
            yield f"data: {json.dumps(APIError(f'generation failed: {errors[0]}', 500, type_='server_error').body())}\n\n"
        if include_usage:
            yield f"data: {head}, {json.dumps({'choices': [], 'usage': self.usage()})[1:]}\n\n"
        yield "data: [DONE]\n\n"
