from pdcli.cli import run

run()
