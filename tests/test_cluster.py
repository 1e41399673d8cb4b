"""A head and two `pdcli node` processes on 127.0.0.1 (CPU, gloo on lo): outputs through the OpenAI server equal
the collocated path and transformers; a node with a wrong token or another model is refused; no listening
socket on a wildcard address; a stopped (hung) node is fenced off by the heartbeat, a killed one is lost at
once; the survivors keep serving and their pools are full. One cluster for the module, every wait bounded."""
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from test_serve import children, free_port, kv_free
from test_shutdown import _as_a_terminal_job
from tiny_models import hf_greedy

ENGINE = ["--num-kv-blocks", "1024", "--block-size", "8", "--max-model-len", "4096"]
ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PDCLI_CLUSTER_TOKEN": ""}
LOST_S = 10.0  # a lost node's requests end within this


def pdcli(*args: str, env: dict | None = None) -> subprocess.Popen:
    """A pdcli process in its own group, with Ctrl-C's default action (a shell's background job would inherit
    SIGINT ignored)."""
    return subprocess.Popen([sys.executable, "-m", "pdcli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env or ENV, start_new_session=True, preexec_fn=_as_a_terminal_job)


def start_node(path: str, addr: str, rank: int, role: str, *extra: str,
               env: dict | None = None) -> subprocess.Popen:
    return pdcli("node", "--model", path, "--dist-init-addr", addr, "--node-rank", str(rank), f"--{role}", "cpu",
                 *ENGINE, *extra, env=env)


def roles(base: str) -> dict[str, int]:
    """role -> live workers, from /metrics."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    out: dict[str, int] = {}
    for ln in text.splitlines():
        if ln.startswith("pdcli_kv_blocks_total{"):
            role = ln.split('role="')[1].split('"')[0]
            out[role] = out.get(role, 0) + 1
    return out


def wait_until(what, timeout: float, why: str) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, why
        time.sleep(0.2)


@contextlib.contextmanager
def running_cluster(path: str, *extra: str):
    """A head (collocated worker) and nodes 1 (prefill) and 2 (decode), all with `extra` flags, serving; each
    process stopped (Ctrl-C, else killed) after."""
    port, cport = free_port(), free_port()
    addr, base = f"127.0.0.1:{cport}", f"http://127.0.0.1:{port}"
    head = pdcli("serve", "--model", path, "--mode", "disaggregated", "--collocated", "cpu", "--port", str(port),
                 "--served-model-name", "tiny", "--dist-init-addr", addr, "--nnodes", "3", "--node-timeout", "150",
                 *ENGINE, *extra)
    c = dict(path=path, addr=addr, base=base, head=head,
             nodes={1: start_node(path, addr, 1, "prefill", *extra), 2: start_node(path, addr, 2, "decode", *extra)})

    def up() -> bool:
        assert head.poll() is None, head.communicate()
        try:
            return httpx.get(f"{base}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, 180, "the cluster did not start")
        yield c
    finally:
        for p in [head, *c["nodes"].values()]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
        for p in [head, *c["nodes"].values()]:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    with running_cluster(tiny_model_dir("llama-gqa")) as c:
        yield c


def complete(base: str, prompt, max_tokens: int, **kw) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", timeout=120, json={
        "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **kw})


def test_greedy_through_two_nodes_equals_collocated_and_transformers(cluster, prompts):
    from pdcli import LLM, SamplingParams

    base = cluster["base"]
    assert roles(base) == {"collocated": 1, "prefill": 1, "decode": 1}
    want = hf_greedy(cluster["path"], prompts, 12)
    local = LLM(cluster["path"], device="cpu", num_kv_blocks=256, block_size=8)
    collocated = [o.outputs[0].token_ids for o in local.generate(
        prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))]
    assert collocated == want
    got = []
    for p in prompts:  # P on node 1, D on node 2: the KV crosses "hosts"
        r = complete(base, p, 12, logprobs=1)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        got.append((choice["text"], choice["logprobs"]["tokens"]))
    text = httpx.get(f"{base}/metrics", timeout=30).text
    assert f'pdcli_path_requests_total{{path="disaggregated"}} {len(prompts)}' in text
    assert 'role="collocated",node="0"' in text and 'role="prefill",node="1"' in text and \
        'role="decode",node="2"' in text  # each worker's node in its labels
    tok = local.engine.tokenizer
    assert got == [(tok.decode(ids), [tok.decode([t]) for t in ids]) for ids in want]
    forked = complete(base, prompts[0], 12, n=2)  # n > 1: the collocated worker on the head
    assert [c["text"] for c in forked.json()["choices"]] == [tok.decode(want[0])] * 2
    free, total = kv_free(base)
    assert free == total == 3 * 1024


def listening(pids: set[int]) -> list[str]:
    """Local addresses of the TCP sockets in LISTEN state that these processes hold."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            pass
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for ln in f.readlines()[1:]:
                cols = ln.split()
                if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                    out.append(cols[1])
    return out


def test_no_socket_of_the_cluster_listens_on_a_wildcard_address(cluster):
    pids = {cluster["head"].pid, *children(cluster["head"].pid)}
    for node in cluster["nodes"].values():
        pids |= {node.pid, *children(node.pid)}
    addrs = listening(pids)
    assert len(addrs) >= 4  # HTTP, the cluster's listener, the store, gloo's
    loopback = {"0100007F"}  # 127.0.0.1, little-endian hex
    assert all(a.split(":")[0] in loopback for a in addrs), addrs


def test_a_wrong_token_or_another_model_is_refused_and_the_head_keeps_serving(cluster, tiny_model_dir):
    wrong = start_node(cluster["path"], cluster["addr"], 3, "decode", env={**ENV, "PDCLI_CLUSTER_TOKEN": "wrong"})
    other = start_node(tiny_model_dir("llama-mha-tied"), cluster["addr"], 3, "decode")
    for proc, says in ((wrong, "refused this node's cluster token"), (other, "a different model")):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode != 0
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], err
    assert "num_key_value_heads" in err
    assert complete(cluster["base"], "still here", 4).status_code == 200
    assert roles(cluster["base"]) == {"collocated": 1, "prefill": 1, "decode": 1}


async def _long_requests(base: str, n: int, max_tokens: int, event: str, act) -> list[tuple[int, float]]:
    """n requests through P/D; once all are decoding (tokens flowing), act(); (status, s from act to the end)."""
    acted: list[float] = []

    async def one(client: httpx.AsyncClient, i: int):
        r = await client.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": f"{event} {i}",
                                                              "max_tokens": max_tokens, "temperature": 0,
                                                              "ignore_eos": True})
        return r.status_code, time.monotonic() - acted[0] if acted else -1.0

    async with httpx.AsyncClient(timeout=120) as client:
        tasks = [asyncio.create_task(one(client, i)) for i in range(n)]
        await asyncio.sleep(2.0)  # prefilled on node 1, decoding on node 2
        assert not any(t.done() for t in tasks)
        act()
        acted.append(time.monotonic())
        return await asyncio.wait_for(asyncio.gather(*tasks), 60)


def survivors_serve(base: str) -> None:
    r = complete(base, "after", 6)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
    free, total = kv_free(base)
    assert free == total > 0


def test_a_hung_node_is_fenced_off_by_the_heartbeat(cluster):
    base, node = cluster["base"], cluster["nodes"][2]
    results = asyncio.run(_long_requests(base, 3, 3000, "hung", lambda: os.killpg(node.pid, signal.SIGSTOP)))
    try:
        assert all(code == 500 and took < LOST_S for code, took in results), results
        assert roles(base) == {"collocated": 1, "prefill": 1}
        survivors_serve(base)  # no decode worker left: the collocated one serves
    finally:
        os.killpg(node.pid, signal.SIGCONT)
    node.communicate(timeout=30)  # resumed, it finds itself fenced off and exits
    assert node.returncode != 0
    assert roles(base) == {"collocated": 1, "prefill": 1}


def test_a_node_that_comes_back_joins_as_new_and_a_killed_one_is_lost(cluster):
    base = cluster["base"]
    node = cluster["nodes"][2] = start_node(cluster["path"], cluster["addr"], 2, "decode")
    wait_until(lambda: roles(base).get("decode") == 1, 120, "node 2 did not rejoin")
    text = httpx.get(f"{base}/metrics", timeout=30).text
    assert 'rank="1",role="decode"' not in text  # its rank is new: ranks are never reused
    results = asyncio.run(_long_requests(base, 3, 3000, "killed", lambda: os.killpg(node.pid, signal.SIGKILL)))
    assert all(code == 500 and took < LOST_S for code, took in results), results
    survivors_serve(base)
    assert roles(base) == {"collocated": 1, "prefill": 1}


def test_a_node_leaves_on_ctrl_c_and_the_head_routes_around_it(cluster):
    base, node = cluster["base"], cluster["nodes"][1]
    os.killpg(node.pid, signal.SIGINT)
    _, err = node.communicate(timeout=60)
    assert node.returncode == 0, err
    assert "leaving" in err
    assert roles(base) == {"collocated": 1}
    survivors_serve(base)


def test_profile_measures_handoffs_to_a_node(tiny_model_dir):
    """`pdcli profile --dist-init-addr`: the cross-node pair's transfers, timed like the local ones (bytes =
    tokens x KV bytes per token), for `pdcli fit`'s "net" entry."""
    from pdcli.profiler import profile_transfer_net

    path = tiny_model_dir("llama-gqa")
    cport = free_port()
    node = start_node(path, f"127.0.0.1:{cport}", 1, "decode")
    try:
        got = profile_transfer_net(path, "cpu", dict(num_kv_blocks=1024, block_size=8, max_model_len=4096),
                                   ("127.0.0.1", cport), 120, lengths=(16, 256), repeats=2)["net"]
    finally:
        node.communicate(timeout=60)  # the head stopped: the node follows, exit 0
    assert node.returncode == 0
    assert sorted(got["tokens"]) == [16, 16, 256, 256] and all(ms > 0 for ms in got["ms"])
    per_token = {b / n for n, b in zip(got["tokens"], got["bytes"])}
    assert len(per_token) == 1  # 2 layers x K|V x 2 KV heads x head_dim 16 x fp32


def test_workers_are_keyed_by_node_and_device():
    from pdcli.router.cost_model import CostModel
    from pdcli.workers.layout import WorkerSpec, transfer_pair

    a, b = WorkerSpec(0, "prefill", "cuda:0"), WorkerSpec(1, "decode", "cuda:0", node=1)
    assert (a.place, b.place) == ("cuda:0", "n1/cuda:0")
    assert transfer_pair(a, b) == "net" and transfer_pair(a, WorkerSpec(2, "decode", "cuda:0")) == "gpu-ipc"
    cm = CostModel([1, 0, 0, 0, 0], [1, 0, 0], [0, 1, 1], {"gpu-ipc": (0.5, 100.0)}, 2048, 1000)
    assert "100 Gbit/s" in cm.assume_net(100)
    assert cm.transfer_ms(1000, "net") == pytest.approx(1000 * 1000 * 8 / (100 * 1e6))  # 1 MB at 100 Gbit/s
    assert cm.assume_net(25) is None  # the profiled (or first) net entry stays


def test_a_cluster_off_loopback_needs_a_token(monkeypatch):
    from pdcli.cluster.transport import ClusterError, authkey

    monkeypatch.delenv("PDCLI_CLUSTER_TOKEN", raising=False)
    assert authkey("127.0.0.1") and authkey("localhost")
    with pytest.raises(ClusterError, match="PDCLI_CLUSTER_TOKEN"):
        authkey("10.1.2.3")
    monkeypatch.setenv("PDCLI_CLUSTER_TOKEN", "s3cret")
    assert authkey("10.1.2.3") == b"s3cret"


def test_a_head_whose_nodes_do_not_come_says_which(tiny_model_dir):
    head = pdcli("serve", "--model", tiny_model_dir("llama-gqa"), "--device", "cpu", "--port", str(free_port()),
                 "--dist-init-addr", f"127.0.0.1:{free_port()}", "--nnodes", "3", "--node-timeout", "2", *ENGINE)
    out, err = head.communicate(timeout=120)
    assert head.returncode == 1
    assert err.strip().splitlines()[-1] == "error: node rank(s) 1, 2 did not join within 2 s"


def test_tensor_parallel_workers_hand_kv_across_nodes(tiny_model_dir, prompts):
    """Prefill (tp=2) on node 1, decode (tp=2) on node 2: each rank's KV shard crosses to its peer rank."""
    from pdcli import LLM, SamplingParams
    from pdcli.models.loader import resolve

    path = tiny_model_dir("llama-gqa")
    with running_cluster(path, "-tp", "2") as c:
        want = [o.outputs[0].token_ids for o in LLM(path, device="cpu", num_kv_blocks=64, block_size=8).generate(
            prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))]
        decode = resolve(path).tokenizer.decode
        got = [complete(c["base"], p, 12).json()["choices"][0]["text"] for p in prompts]
        assert got == [decode(ids) for ids in want]
        text = httpx.get(f"{c['base']}/metrics", timeout=30).text
        assert f'pdcli_path_requests_total{{path="disaggregated"}} {len(prompts)}' in text
        free, total = kv_free(c["base"])
        assert free == total == 3 * 1024