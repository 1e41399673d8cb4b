"""pdcli serve through a real server process on a loopback port (tiny model, CPU)."""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from pdcli import LLM, SamplingParams

KEY = "sk-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    path = tiny_model_dir("llama-gqa")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pdcli", "serve", "--model", path, "--port", str(port),
                             "--api-key", KEY, "--served-model-name", "tiny", "--num-kv-blocks", "1024",
                             "--block-size", "8", "--max-num-seqs", "256", "--max-model-len", "512"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read()}")
    else:
        proc.kill()
        pytest.fail("server did not start")
    yield dict(base=base, path=path, proc=proc)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server['base']}/v1", api_key=KEY, timeout=60)


@pytest.fixture(scope="module")
def local(server):
    return LLM(server["path"], device="cpu", num_kv_blocks=256, block_size=8)


def test_models_lists_id_and_root(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].root == server["path"]


def test_completions_match_llm_generate(client, local):
    want = local.generate(["Hello world"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].text
    got = client.completions.create(model="tiny", prompt="Hello world", max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == want and got.usage.completion_tokens == 12
    stream = client.completions.create(model="tiny", prompt="Hello world", max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []


def test_chat_matches_llm_generate(client, local):
    want = local.generate(["How are you"], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                          chat=True)[0].text
    msgs = [{"role": "user", "content": "How are you"}]
    got = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want


def test_stop_string_cuts_the_text(client):
    full = client.completions.create(model="tiny", prompt="Hello world", max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(full) > 8
    i = next(i for i in range(2, len(full) - 1) if "\ufffd" not in full[i:i + 2])  # whole characters only
    stop = full[i:i + 2]
    cut = client.completions.create(model="tiny", prompt="Hello world", max_tokens=20, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="Hello world", max_tokens=20, temperature=0,
                                         stop=stop, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == full[:full.index(stop)]


def test_n_and_seed(client):
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=1.0, n=3, seed=7,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    again = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=1.0, n=3, seed=7,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in r.choices] == [c.text for c in again.choices]


BAD = [
    ("completions", b"{not json", 400),
    ("completions", {"model": "tiny"}, 400),  # missing prompt
    ("completions", {"model": "tiny", "prompt": 5}, 400),
    ("completions", {"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400),
    ("completions", {"model": "tiny", "prompt": "hi", "max_tokens": -3}, 400),
    ("completions", {"model": "tiny", "prompt": "hi", "max_tokens": 100000}, 400),
    ("completions", {"model": "tiny", "prompt": "hello " * 600}, 400),
    ("completions", {"model": "other", "prompt": "hi"}, 404),
    ("completions", {"model": "tiny", "prompt": "hi", "n": 1000}, 400),
    ("completions", {"model": "tiny", "prompt": "hi", "stop": [3]}, 400),
    ("completions", {"model": "tiny", "prompt": "hi", "temperature": "hot"}, 400),
    ("completions", {"model": "tiny", "prompt": "hi", "temperature": -1}, 400),
    ("chat/completions", {"model": "tiny", "messages": "hi"}, 400),
    ("chat/completions", {"model": "tiny", "messages": []}, 400),
]


@pytest.mark.parametrize("route, body, status", BAD)
def test_bad_input_gets_openai_error_then_server_still_serves(server, client, route, body, status):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server['base']}/v1/{route}", content=data, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    ok = client.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body={"ignore_eos": True})
    assert ok.usage.completion_tokens == 2


def test_api_key_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"{server['base']}/v1/completions", json={"model": "tiny", "prompt": "hi"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{server['base']}/v1/models", headers=headers).status_code == 401
    assert httpx.get(f"{server['base']}/health").status_code == 200


def metric(base: str, name: str) -> int:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return int(sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name + "{")))


def kv_free(base: str) -> tuple[int, int]:
    return metric(base, "pdcli_kv_blocks_free"), metric(base, "pdcli_kv_blocks_total")


def test_200_concurrent_streams_50_disconnect_then_pool_is_full(server):
    base, headers = server["base"], {"Authorization": f"Bearer {KEY}"}

    async def one(client: httpx.AsyncClient, i: int, leave_early: bool):
        body = {"model": "tiny", "prompt": f"request {i} says hello", "max_tokens": 24 if not leave_early else 400,
                "temperature": 0, "stream": True, "ignore_eos": True}
        async with client.stream("POST", f"{base}/v1/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            n = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    n += 1
                    if leave_early and n >= 2:
                        return "left"
                    if line == "data: [DONE]":
                        return "done"
        return "cut"

    async def run():
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i, i % 4 == 0) for i in range(200))), 240)

    tokens_before = metric(base, "pdcli_path_output_tokens_total")
    failed_before, aborted_before = metric(base, "pdcli_path_failed_total"), metric(base, "pdcli_path_aborted_total")
    results = asyncio.run(run())
    assert results.count("left") == 50 and results.count("done") == 150
    deadline = time.monotonic() + 30
    while True:
        free, total = kv_free(base)
        if free == total or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert free == total > 0
    # the 50 that left asked for 400 tokens each: aborted at once, they made far fewer
    made = metric(base, "pdcli_path_output_tokens_total") - tokens_before
    assert made < 150 * 24 + 50 * 100, made
    # clients that hung up are aborted requests, not failed ones
    assert metric(base, "pdcli_path_failed_total") == failed_before
    assert metric(base, "pdcli_path_aborted_total") - aborted_before == 50


def test_bench_endpoint_runs_against_the_server(server, tmp_path):
    from typer.testing import CliRunner

    from pdcli.cli import app

    r = CliRunner().invoke(app, ["bench", "--model", server["path"], "--endpoint", server["base"], "--api-key", KEY,
                                 "--arrival-rate", "20", "--num-prompts", "12", "--workload", "random",
                                 "--random-input-len", "32", "--random-output-len", "8", "--max-model-len", "512",
                                 "--result-dir", str(tmp_path)])
    assert r.exit_code == 0, r.stderr
    data = json.load(open(r.stdout.split()[-1]))
    assert data["mode"] == "endpoint" and data["completed"] == 12 and data["failed"] == 0
    assert data["total_output_tokens"] == 12 * 8 and data["mean_ttft_ms"] > 0


def test_sigint_stops_server_and_workers(server):
    proc = server["proc"]
    kids = children(proc.pid)
    assert kids
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) is not None
    time.sleep(1)
    assert not [k for k in kids if os.path.exists(f"/proc/{k}") and open(f"/proc/{k}/stat").read().split()[2] != "Z"]


def test_serve_overhead_benchmark_runs(tiny_model_dir, tmp_path):
    """The HTTP-overhead benchmark: the same seeded load in-process and against a `pdcli serve` subprocess."""
    import json

    from pdcli.benchmarks.serve_overhead import main

    path = tiny_model_dir("llama-gqa")
    rc = main(["--model", path, "--device", "cpu", "--rate", "4", "--duration", "2", "--random-input-len", "32",
               "--random-output-len", "8", "--max-model-len", "256", "--num-kv-blocks", "256",
               "--startup-timeout", "180", "--out", str(tmp_path)])
    assert rc == 0
    res = json.load(open(tmp_path / "serve_overhead_cpu.json"))
    s = res["summary"]
    assert s["num_prompts"] == 8 and s["inproc_failed"] == 0 and s["http_failed"] == 0
    assert res["inproc"]["completed"] == res["http"]["completed"] == 8
    assert s["inproc_output_throughput"] > 0 and s["http_output_throughput"] > 0


@pytest.mark.parametrize("text", ["héllo wörld, ça va? 東京 🙂 end", "a  b\n\nc\t d 🙂🙂 e"])
def test_streamed_text_adds_up_to_the_whole_decode(text):
    """TextStream decodes each new token in a short window (O(1) per token) and the whole output once at the
    end; the deltas, fed one token at a time or several at once, add up to the non-streaming text and never
    end inside a character."""
    from pdcli.coordinator.output import TextStream
    from pdcli.models.tokenizer import HFTokenizer
    from tiny_models import make_tokenizer

    tok = HFTokenizer(make_tokenizer())
    ids = tok.encode(text)
    for step in (1, 3):
        stream, deltas = TextStream(tok, []), []
        for end in range(step, len(ids) + step, step):
            done = end >= len(ids)
            deltas.append(stream.update(ids[:end], tok.decode(ids[:end]) if done else None))
            assert "\ufffd" not in deltas[-1]
        assert "".join(deltas) == tok.decode(ids)
        assert sum(bool(d) for d in deltas[:-1]) > len(deltas) // 3  # text streamed along the way
