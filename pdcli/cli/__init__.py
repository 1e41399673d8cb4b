"""The `pdcli` Typer app: one module per subcommand, heavy imports inside the commands."""
from __future__ import annotations

import os
import sys

import typer

from pdcli import __version__
from pdcli.cli import bench, fit, generate, node, plan, plot, profile, replay, serve

app = typer.Typer(name="pdcli", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="LLM serving with prefill/decode disaggregation.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pdcli {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit."),
         log_level: str = typer.Option("warning", "--log-level", help="debug, info, warning, error or critical: "
                                       "pdcli's log (stderr), its worker processes' and uvicorn's.")) -> None:
    from pdcli.logger import init_logging

    try:
        init_logging(log_level)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--log-level") from None


app.command("generate")(generate.generate)
app.command("profile")(profile.profile)
app.command("fit")(fit.fit)
app.command("bench")(bench.bench)
app.command("plot")(plot.plot)
app.command("serve")(serve.serve)
app.command("replay")(replay.replay)
app.command("plan")(plan.plan)
app.command("node")(node.node)


def run() -> None:
    """The console script: the app, then, for a command that asked for it, an exit that skips the
    interpreter's teardown (torch's takes ~0.4 s) once the output is flushed."""
    from pdcli.cli import common

    try:
        app()
    except SystemExit as e:
        code = e.code
    else:
        code = 0
    if common.fast_exit:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)
    sys.exit(code)
