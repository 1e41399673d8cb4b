"""Ctrl-C as a terminal sends it (SIGINT to the whole process group) stops `pdcli bench`, `pdcli generate
--mode ...` and `pdcli serve` and every process they started, within the graceful-shutdown time plus 2 s;
bench and generate exit 130, serve as uvicorn does (0); a second Ctrl-C stops at once."""
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pdcli.cli.serve import GRACEFUL_S
from pdcli.coordinator.worker_pool import SHUTDOWN_S

TINY = ["--model", "dummy:tiny-llama", "--num-kv-blocks", "256", "--block-size", "8"]


def group_alive(pgid: int) -> list[int]:
    """Processes of the group that are not zombies."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(d))
    return out


def _as_a_terminal_job() -> None:
    """Ctrl-C's default action, as in a terminal: a test run started in the background of a shell inherits
    SIGINT ignored (POSIX, for asynchronous commands), and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pdcli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,  # its own process group, as a terminal job
                            preexec_fn=_as_a_terminal_job)


def wait_for(proc: subprocess.Popen, what, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "did not get going"
        time.sleep(0.2)


def workers_up(pgid: int, n: int):
    return lambda: len(group_alive(pgid)) >= 1 + n


def ctrl_c(proc: subprocess.Popen, limit: float, times: int = 1) -> tuple[int, float]:
    """SIGINT to the group (`times` times, 0.2 s apart); (exit code, seconds until no process of it is left)."""
    began = time.monotonic()
    for _ in range(times):
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.2)
    code = proc.wait(limit + 30)
    while group_alive(proc.pid) and time.monotonic() - began < limit + 30:
        time.sleep(0.1)
    assert not group_alive(proc.pid), f"left running: {group_alive(proc.pid)}"
    return code, time.monotonic() - began


def test_ctrl_c_of_bench_writes_what_finished_and_exits_130(tmp_path):
    proc = start(["bench", *TINY, "--devices", "cpu,cpu", "--mode", "collocated", "--arrival-rate", "20",
                  "--num-prompts", "400", "--random-input-len", "64", "--random-output-len", "400",
                  "--result-dir", str(tmp_path)])
    wait_for(proc, workers_up(proc.pid, 2))
    time.sleep(3)  # requests are running
    code, took = ctrl_c(proc, SHUTDOWN_S)
    out, err = proc.communicate()
    assert code == 130, err
    assert took < SHUTDOWN_S + 2, took
    files = glob.glob(str(tmp_path / "*.json"))
    assert len(files) == 1 and files[0] in out
    res = json.load(open(files[0]))
    assert res["interrupted"] is True and res["completed"] + res["aborted"] + res["failed"] == res["num_prompts"] > 0
    assert "pdcli plot" in err


def test_ctrl_c_of_generate_with_workers_exits_130():
    proc = start(["generate", "hello", *TINY, "--mode", "disaggregated", "--collocated", "cpu", "--prefill", "cpu",
                  "--decode", "cpu", "--max-tokens", "5000", "--ignore-eos", "--no-chat", "--max-model-len", "8192",
                  "--num-kv-blocks", "2048"])
    wait_for(proc, workers_up(proc.pid, 3))
    time.sleep(2)
    code, took = ctrl_c(proc, SHUTDOWN_S)
    assert code == 130, proc.communicate()
    assert took < SHUTDOWN_S + 2, took


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("times", [1, 2], ids=["graceful", "second-ctrl-c"])
def test_ctrl_c_of_serve_stops_it_and_its_workers(times):
    import httpx

    port = free_port()
    proc = start(["serve", *TINY, "--collocated", "cpu", "--prefill", "cpu", "--decode", "cpu", "--port", str(port)])

    def healthy():
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(proc, healthy)
    code, took = ctrl_c(proc, GRACEFUL_S + SHUTDOWN_S, times)
    assert code == 0, proc.communicate()
    assert took < (GRACEFUL_S if times == 1 else 0) + 2, took
