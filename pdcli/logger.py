"""Logging: everything under the `pdcli` logger; one level for the whole app (`pdcli --log-level LEVEL ...`),
handed to every worker process, whose lines carry its rank, role and device."""
from __future__ import annotations

import logging
import sys

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMAT = "%(asctime)s %(levelname)s %(name)s{where}: %(message)s"

logger = logging.getLogger("pdcli")


def parse_level(name: str) -> int:
    if name.lower() not in LEVELS:
        raise ValueError(f"unknown log level {name!r}: use {', '.join(LEVELS)}")
    return getattr(logging, name.upper())


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at each record (a test's capture, a redirected stream)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def init_logging(level: int | str = logging.WARNING, where: str = "") -> None:
    """Send the pdcli logger's records at `level` and above to stderr (once per process; later calls set the
    level only)."""
    level = parse_level(level) if isinstance(level, str) else level
    logger.setLevel(level)
    if not any(getattr(h, "_pdcli", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler._pdcli = True
        handler.setFormatter(logging.Formatter(FORMAT.format(where=where), datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False


def init_worker_logging(level: int, spec) -> None:
    init_logging(level, f" [{spec.role} {spec.rank} {spec.device}]")


def current_level() -> int:
    """The level to hand to worker processes."""
    return logger.getEffectiveLevel()
