"""The design card's sequence as a user types it, short: profile, fit, bench (--device), plot a folder,
generate; every step through the `pdcli` command, in a fresh folder."""
import glob
import json
import os
import subprocess
import sys

TINY = ["--model", "dummy:tiny-llama"]


def pdcli(cwd, *args, timeout=300):
    r = subprocess.run([sys.executable, "-m", "pdcli", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"pdcli {' '.join(args)}: {r.stderr[-2000:]}"
    return r


def test_profile_fit_bench_plot_generate(tmp_path):
    r = pdcli(tmp_path, "profile", *TINY, "--device", "cpu", "--max-seconds", "6")
    profile = r.stdout.strip().splitlines()[-1]
    assert os.path.isfile(tmp_path / profile) and profile.startswith("profiles")
    r = pdcli(tmp_path, "fit")  # the newest profile under profiles/
    assert "R²" in r.stdout and os.path.isfile(tmp_path / os.path.dirname(profile) / "params.json")
    r = pdcli(tmp_path, "bench", *TINY, "--device", "cpu,cpu", "--arrival-rate", "2", "--workload", "long",
              "--num-prompts", "3", "--max-model-len", "4096", "--num-kv-blocks", "1024")
    files = sorted(glob.glob(str(tmp_path / "results" / "*.json")))
    assert len(files) == 1 and "pdcli plot" in r.stderr
    assert json.load(open(files[0]))["completed"] == 3
    r = pdcli(tmp_path, "plot", "results")
    pngs = r.stdout.split()
    assert pngs and all(p.endswith(".png") and os.path.isfile(tmp_path / p) for p in pngs)
    r = pdcli(tmp_path, "generate", "hello", *TINY, "--device", "cpu", "--max-tokens", "4", "--ignore-eos")
    assert "4 tokens" in r.stderr
