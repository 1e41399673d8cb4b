"""OpenAI request parsing and error objects. Every bad input becomes an `APIError` with a 4xx status; every key
of a request body is either parsed and validated or refused with a 400 naming it, never ignored (README, Serve)."""
from __future__ import annotations

from pdcli.sampling_params import MAX_LOGPROBS, SamplingParams, StructuredOutputsParams

MAX_N = 16

# parsed by both endpoints (a null value counts as absent)
COMMON = frozenset({
    "model", "stream", "stream_options", "n", "max_tokens", "temperature", "top_p", "seed", "stop", "presence_penalty",
    "frequency_penalty", "logit_bias", "response_format", "user",  # user: end-user id, metadata only (as vLLM)
    "best_of",  # accepted when it equals n (vLLM's V1 engine has no best_of either)
    "top_k", "min_p", "repetition_penalty", "min_tokens", "stop_token_ids", "ignore_eos",  # vLLM's extras
    "include_stop_str_in_output",
})
COMPLETIONS = COMMON | {"prompt", "logprobs", "echo"}
CHAT = COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}
# known to OpenAI or vLLM, not implemented here: why, in the error
UNSUPPORTED = {
    "tools": "tool calling is not supported", "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported", "function_call": "function calling is not supported",
    "parallel_tool_calls": "tool calling is not supported", "suffix": "suffix (insertion) is not supported",
    "prompt_logprobs": "prompt log-probabilities are not supported", "use_beam_search": "beam search is not supported",
    "length_penalty": "beam search is not supported", "guided_json": "use response_format",
    "guided_regex": "regex constraints are not supported", "guided_choice": "choice constraints are not supported",
    "guided_grammar": "grammar constraints are not supported", "structured_outputs": "use response_format",
    "allowed_token_ids": "allowed_token_ids is not supported", "bad_words": "bad_words is not supported",
}


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.type, self.headers = status, param, code, type_, headers

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def check_parameters(body: dict, chat: bool) -> None:
    """A 400 naming the first key of body this endpoint does not implement."""
    known = CHAT if chat else COMPLETIONS
    for key, value in body.items():
        if key in known or value is None:
            continue
        why = UNSUPPORTED.get(key, "this server does not know it")
        raise APIError(f"Unsupported parameter: '{key}' ({why})", param=key, code="unsupported_parameter")


def _num(body: dict, key: str, kind, default):
    v = body.get(key, default)
    if v is None:
        return default
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, kind) or isinstance(v, bool):
        raise APIError(f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {v!r}", param=key)
    return v


def flag(body: dict, key: str) -> bool:
    v = body.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise APIError(f"'{key}' must be a boolean", param=key)
    return v


def _max_tokens(body: dict, prompt_len: int, max_model_len: int) -> int:
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
    return max_tokens


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 16 or any(not isinstance(s, str) or not s for s in stop):
        raise APIError("'stop' must be a non-empty string or a list of at most 16 non-empty strings", param="stop")
    return stop


def _token_ids(body: dict, key: str, vocab_size: int) -> list[int]:
    ids = body.get(key) or []
    if not isinstance(ids, list) or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size
                                        for t in ids):
        raise APIError(f"'{key}' must be a list of token ids below {vocab_size}", param=key)
    return ids


def _logit_bias(body: dict, vocab_size: int) -> dict[int, float] | None:
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise APIError("'logit_bias' must map token ids to numbers in [-100, 100]", param="logit_bias")
    out = {}
    for k, v in bias.items():
        try:
            tid = int(k)
        except (TypeError, ValueError):
            raise APIError(f"logit_bias key {k!r} is not a token id", param="logit_bias") from None
        if not 0 <= tid < vocab_size:
            raise APIError(f"logit_bias token id {tid} is outside the vocabulary (size {vocab_size})",
                           param="logit_bias")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise APIError(f"logit_bias of token {tid} must be a number in [-100, 100], got {v!r}", param="logit_bias")
        out[tid] = float(v)
    return out


def _logprobs(body: dict, chat: bool) -> int | None:
    """Completions: logprobs = how many top alternatives; chat: logprobs (bool) + top_logprobs."""
    if not chat:
        k = _num(body, "logprobs", int, None)
        if k is not None and not 0 <= k <= MAX_LOGPROBS:
            raise APIError(f"'logprobs' must be in [0, {MAX_LOGPROBS}], got {k}", param="logprobs")
        if k is not None and flag(body, "echo"):
            raise APIError("'echo' with 'logprobs' needs prompt log-probabilities, which are not supported",
                           param="echo", code="unsupported_parameter")
        return k
    top = _num(body, "top_logprobs", int, None)
    if not flag(body, "logprobs"):
        if top is not None:
            raise APIError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return None
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise APIError(f"'top_logprobs' must be in [0, {MAX_LOGPROBS}], got {top}", param="top_logprobs")
    return top or 0


def structured_outputs(body: dict) -> StructuredOutputsParams | None:
    """response_format: text (nothing), json_object, or json_schema {name, schema, strict}."""
    rf = body.get("response_format")
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind != "json_schema":
        raise APIError("'response_format' must be {'type': 'text' | 'json_object' | 'json_schema', ...}",
                       param="response_format")
    spec = rf.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise APIError("'response_format.json_schema.schema' must be a JSON schema object", param="response_format")
    params = StructuredOutputsParams(json=schema)
    from pdcli.engine.structured_output import check_schema

    try:
        check_schema(params)
    except ValueError as e:
        raise APIError(str(e), param="response_format") from None
    return params


def _penalties(body: dict) -> dict:
    return dict(presence_penalty=_num(body, "presence_penalty", float, 0.0),
                frequency_penalty=_num(body, "frequency_penalty", float, 0.0),
                repetition_penalty=_num(body, "repetition_penalty", float, 1.0))


def sampling_params(body: dict, prompt_len: int, max_model_len: int, vocab_size: int = 2**31,
                    chat: bool = False) -> SamplingParams:
    max_tokens = _max_tokens(body, prompt_len, max_model_len)
    n = _num(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise APIError(f"n must be between 1 and {MAX_N}, got {n}", param="n")
    best_of = _num(body, "best_of", int, None)
    if best_of is not None and best_of != n:
        raise APIError(f"'best_of' ({best_of}) other than n ({n}) is not supported", param="best_of",
                       code="unsupported_parameter")
    try:
        return SamplingParams(
            n=n, temperature=_num(body, "temperature", float, 1.0), top_p=_num(body, "top_p", float, 1.0),
            top_k=_num(body, "top_k", int, -1), min_p=_num(body, "min_p", float, 0.0), seed=_num(body, "seed", int, None),
            max_tokens=max_tokens, min_tokens=_num(body, "min_tokens", int, 0), stop=_stop(body),
            stop_token_ids=_token_ids(body, "stop_token_ids", vocab_size), ignore_eos=flag(body, "ignore_eos"),
            include_stop_str_in_output=flag(body, "include_stop_str_in_output"), **_penalties(body),
            logit_bias=_logit_bias(body, vocab_size), logprobs=_logprobs(body, chat),
            structured_outputs=structured_outputs(body))
    except ValueError as e:
        raise APIError(str(e), param=str(e).split(" ", 1)[0] if " must " in str(e) else None) from e


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
