"""OpenAI request parsing and error objects. Every bad input becomes an `APIError` with a 4xx status."""
from __future__ import annotations

from pdcli.sampling_params import SamplingParams

MAX_N = 16


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.type = status, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def _num(body: dict, key: str, kind, default):
    v = body.get(key, default)
    if v is None:
        return default
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, kind) or isinstance(v, bool):
        raise APIError(f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {v!r}", param=key)
    return v


def sampling_params(body: dict, prompt_len: int, max_model_len: int) -> SamplingParams:
    max_tokens = _num(body, "max_completion_tokens", int, None) or _num(body, "max_tokens", int, None)
    if max_tokens is None:
        max_tokens = max(1, max_model_len - prompt_len)
    if max_tokens <= 0:
        raise APIError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    if prompt_len >= max_model_len:
        raise APIError(f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
                       f"{prompt_len} tokens.", param="prompt", code="context_length_exceeded")
    if prompt_len + max_tokens > max_model_len:
        raise APIError(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                       f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                       f"completion).", param="max_tokens", code="context_length_exceeded")
    n = _num(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise APIError(f"n must be between 1 and {MAX_N}, got {n}", param="n")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 16 or any(not isinstance(s, str) or not s for s in stop):
        raise APIError("'stop' must be a non-empty string or a list of at most 16 non-empty strings", param="stop")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise APIError("'ignore_eos' must be a boolean", param="ignore_eos")
    try:
        return SamplingParams(n=n, temperature=_num(body, "temperature", float, 1.0), top_p=_num(body, "top_p", float, 1.0),
                              top_k=_num(body, "top_k", int, -1), min_p=_num(body, "min_p", float, 0.0),
                              seed=_num(body, "seed", int, None), max_tokens=max_tokens, stop=stop, ignore_eos=ignore_eos)
    except ValueError as e:
        raise APIError(str(e)) from e


def completion_prompts(body: dict, tokenizer) -> list[list[int]]:
    """`prompt` as a string, a list of strings, a token list or a list of token lists."""
    if "prompt" not in body:
        raise APIError("'prompt' is required", param="prompt")
    p = body["prompt"]
    if isinstance(p, str):
        return [tokenizer.encode(p)]
    if isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        return [p]
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        return [tokenizer.encode(x) for x in p]
    if isinstance(p, list) and p and all(isinstance(x, list) and x and all(isinstance(i, int) for i in x) for x in p):
        return p
    raise APIError("'prompt' must be a string, a list of strings, or token ids", param="prompt")


def chat_prompt(body: dict, tokenizer) -> list[int]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
        raise APIError("'messages' must be a non-empty list of {role, content} objects with string content",
                       param="messages")
    try:
        return tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in msgs])
    except ValueError as e:
        raise APIError(str(e), param="messages") from e
