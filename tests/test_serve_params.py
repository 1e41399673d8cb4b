"""The OpenAI parameters through the official client against a `pdcli serve` subprocess (tiny model, CPU): each
changes the output as the engine's reference does; a parameter the server does not implement is a 400 naming it."""
import json

import httpx
import numpy as np
import pytest

from pdcli import SamplingParams
from test_serve import KEY, client, local, server  # noqa: F401 (fixtures: one server for this module)

GREEDY = dict(temperature=0, max_tokens=10)


def test_penalties_bias_min_tokens_and_stop_token_ids_match_the_engine(client, local):  # noqa: F811
    kw = dict(presence_penalty=0.6, frequency_penalty=1.1)
    extra = dict(repetition_penalty=1.3, ignore_eos=True)
    want = local.generate(["Hello world"], SamplingParams(**GREEDY, **kw, **extra))[0].text
    got = client.completions.create(model="tiny", prompt="Hello world", **GREEDY, **kw, extra_body=extra)
    assert got.choices[0].text == want
    plain = client.completions.create(model="tiny", prompt="Hello world", **GREEDY, extra_body={"ignore_eos": True})
    assert plain.choices[0].text != want
    biased = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0,
                                       logit_bias={"2": 100}, extra_body={"min_tokens": 3})
    assert biased.usage.completion_tokens == 4 and biased.choices[0].finish_reason == "stop"  # EOS after 3
    stop = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0,
                                     logit_bias={"42": 100}, extra_body={"stop_token_ids": [42], "ignore_eos": True})
    assert stop.usage.completion_tokens == 1 and stop.choices[0].finish_reason == "stop"


def test_completion_logprobs_match_the_engine(client, local):  # noqa: F811
    want = local.generate(["Hello world"], SamplingParams(**GREEDY, logprobs=3, ignore_eos=True))[0].outputs[0]
    for stream in (False, True):
        r = client.completions.create(model="tiny", prompt="Hello world", **GREEDY, logprobs=3, stream=stream,
                                      extra_body={"ignore_eos": True})
        chunks = list(r) if stream else [r]
        lps = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
        values = [v for lp in lps for v in lp.token_logprobs]
        assert np.allclose(values, [x.logprob for x in want.logprobs], atol=1e-5)
        tops = [t for lp in lps for t in lp.top_logprobs]
        assert len(tops) == 10 and all(1 <= len(t) <= 3 for t in tops)  # keyed by text: two ids may share one
        offsets = [o for lp in lps for o in lp.text_offset]
        tokens = [t for lp in lps for t in lp.tokens]
        assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_chat_logprobs_and_top_logprobs(client, local):  # noqa: F811
    msgs = [{"role": "user", "content": "How are you"}]
    want = local.generate(["How are you"], SamplingParams(**GREEDY, logprobs=2, ignore_eos=True),
                          chat=True)[0].outputs[0]
    r = client.chat.completions.create(model="tiny", messages=msgs, **GREEDY, logprobs=True, top_logprobs=2,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert np.allclose([c.logprob for c in content], [x.logprob for x in want.logprobs], atol=1e-5)
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)
    assert r.choices[0].message.content == "".join(c.token for c in content) or "\ufffd" in "".join(
        c.token for c in content)
    off = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=3)
    assert off.choices[0].logprobs is None


def test_echo_and_seed(client):  # noqa: F811
    r = client.completions.create(model="tiny", prompt="Hello world", **GREEDY, echo=True,
                                  extra_body={"ignore_eos": True})
    plain = client.completions.create(model="tiny", prompt="Hello world", **GREEDY, extra_body={"ignore_eos": True})
    assert r.choices[0].text == "Hello world" + plain.choices[0].text
    a, b = (client.completions.create(model="tiny", prompt="Hi", max_tokens=8, temperature=1, seed=s,
                                      extra_body={"ignore_eos": True}).choices[0].text for s in (1, 2))
    assert a != b


def test_response_format_json_schema_and_json_object(client):  # noqa: F811
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "ok?"}], max_tokens=20,
                                           temperature=1, seed=seed, response_format=fmt)
        assert json.loads(r.choices[0].message.content)["ok"] in (True, False)
        assert r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="tiny", prompt="{", max_tokens=20, temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}})
    assert r.choices[0].text.startswith("{")


UNSUPPORTED = [
    ("completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat/completions", {"tool_choice": "auto"}, "tool_choice"),
    ("completions", {"suffix": "end"}, "suffix"),
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"echo": True, "logprobs": 1}, "echo"),
    ("completions", {"top_logprobs": 2}, "top_logprobs"),  # a chat parameter
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ("chat/completions", {"echo": True}, "echo"),
    ("completions", {"frobnicate": 1}, "frobnicate"),
    ("completions", {"prompt_logprobs": 1}, "prompt_logprobs"),
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"presence_penalty": 3}, "presence_penalty"),
    ("completions", {"logit_bias": {"100000": 1}}, "logit_bias"),
    ("completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
     "response_format"),
    ("completions", {"response_format": {"type": "yaml"}}, "response_format"),
]


@pytest.mark.parametrize("route, extra, param", UNSUPPORTED)
def test_an_unsupported_parameter_is_a_400_naming_it(server, route, extra, param):  # noqa: F811
    body = {"model": "tiny", "max_tokens": 2, **extra}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if route.startswith("chat") else {"prompt": "hi"})
    r = httpx.post(f"{server['base']}/v1/{route}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    if err["code"] == "unsupported_parameter":
        assert f"'{param}'" in err["message"], err


def test_null_and_metadata_parameters_are_accepted(server):  # noqa: F811
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "user": "u-1", "tools": None, "suffix": None,
            "best_of": 1, "response_format": {"type": "text"}}
    r = httpx.post(f"{server['base']}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
