"""CUDA MPS for workers sharing a GPU: when a daemon starts, and how it is started and stopped (a stand-in
control program on PATH records what it is asked)."""
import os
import stat

import pytest

from pdcli.workers import mps
from pdcli.workers.layout import parse_layout

FAKE = """#!/bin/sh
echo "args=$* pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY" >> "{log}"
if [ "$1" != "-d" ]; then cat >> "{log}"; fi
exit {code}
"""


def fake_control(tmp_path, monkeypatch, code=0):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / mps.CONTROL
    log = tmp_path / "calls.log"
    exe.write_text(FAKE.format(log=log, code=code))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_shared_gpus_are_cuda_devices_with_two_or_more_workers():
    assert mps.shared_gpus(parse_layout("cuda:1", "cuda:0", "cuda:0,cuda:1")) == ["cuda:0", "cuda:1"]
    assert mps.shared_gpus(parse_layout("cuda:0", "cuda:1", "cuda:2")) == []
    assert mps.shared_gpus(parse_layout("cpu", "cpu", "cpu")) == []


def test_no_daemon_without_a_shared_gpu_or_when_turned_off(tmp_path, monkeypatch):
    log = fake_control(tmp_path, monkeypatch)
    assert mps.start_for(parse_layout("cuda:0", "cuda:1", "cuda:2"), None) is None
    assert mps.start_for(parse_layout("", "cuda:0", "cuda:0"), False) is None
    assert not log.exists()


def test_daemon_gets_a_private_pipe_directory_and_quits_at_stop(tmp_path, monkeypatch):
    log = fake_control(tmp_path, monkeypatch)
    daemon = mps.start_for(parse_layout("", "cuda:0", "cuda:0"), None)
    assert daemon is not None
    pipe, logdir = daemon.env["CUDA_MPS_PIPE_DIRECTORY"], daemon.env["CUDA_MPS_LOG_DIRECTORY"]
    assert os.path.isdir(pipe) and os.path.isdir(logdir)
    assert log.read_text().splitlines() == [f"args=-d pipe={pipe} log={logdir}"]
    daemon.stop()
    assert log.read_text().splitlines()[1:] == [f"args= pipe={pipe} log={logdir}", "quit"]
    assert not os.path.exists(daemon.root)


def test_auto_falls_back_to_time_slicing_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no control program
    assert mps.start_for(parse_layout("", "cuda:0", "cuda:0"), None) is None
    err = capsys.readouterr().err
    assert "time-sliced" in err and "cuda:0" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(mps.MpsUnavailable, match="not found"):
        mps.start_for(parse_layout("", "cuda:0", "cuda:0"), True)


def test_a_failing_daemon_is_an_error_when_asked_for_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    fake_control(tmp_path, monkeypatch, code=3)
    before = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    with pytest.raises(mps.MpsUnavailable, match="exited 3"):
        mps.start_for(parse_layout("", "cuda:0", "cuda:0"), True)
    assert mps.start_for(parse_layout("", "cuda:0", "cuda:0"), None) is None
    assert "time-sliced" in capsys.readouterr().err
    after = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    assert not {d for d in after - before if d.startswith("pdcli-mps-")}
