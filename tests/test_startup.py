"""The first minute: help answers without loading torch, transformers or the engine."""
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "pdcli.engine", "pdcli.llm", "pdcli.coordinator", "numpy")
COMMANDS = ([], ["generate"], ["profile"], ["fit"], ["bench"], ["plot"], ["serve"])

PROBE = """
import sys
from pdcli.cli import app
try:
    app(sys.argv[1:] + ["--help"])
except SystemExit as e:
    assert e.code == 0, e.code
heavy = [m for m in {heavy!r} if m in sys.modules]
print("HEAVY:" + ",".join(heavy))
"""


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(["pdcli", *c, "--help"]))
def test_help_imports_nothing_heavy(command):
    r = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *command], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == "HEAVY:", r.stdout.strip().splitlines()[-1]
