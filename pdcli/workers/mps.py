"""CUDA MPS for workers that share a GPU.

Two processes on one GPU are time-sliced: a prefill worker's GEMMs and a decode worker's bandwidth-bound
steps take turns. Under MPS (the Multi-Process Service) their kernels run at the same time, as in Semi-PD's
same-GPU disaggregation. The coordinator starts a private control daemon (its own pipe directory, so no
process outside pdcli joins it), hands its environment to the workers and stops it after them.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile

from pdcli.workers.layout import WorkerSpec

logger = logging.getLogger("pdcli.mps")

CONTROL = "nvidia-cuda-mps-control"


class MpsUnavailable(RuntimeError):
    pass


def shared_gpus(layout: list[WorkerSpec]) -> list[str]:
    """GPUs that two or more workers of the layout run on."""
    devices = [s.device for s in layout if s.device.startswith("cuda")]
    return sorted({d for d in devices if devices.count(d) > 1})


class MpsDaemon:
    def __init__(self, exe: str, root: str):
        self.exe, self.root = exe, root
        # every process given this environment (before CUDA starts in it) is a client of this daemon
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": os.path.join(root, "pipe"),
                    "CUDA_MPS_LOG_DIRECTORY": os.path.join(root, "log")}

    @classmethod
    def start(cls) -> "MpsDaemon":
        exe = shutil.which(CONTROL)
        if exe is None:
            raise MpsUnavailable(f"{CONTROL} not found on PATH")
        daemon = cls(exe, tempfile.mkdtemp(prefix="pdcli-mps-"))
        for d in daemon.env.values():
            os.makedirs(d)
        try:
            run = subprocess.run([exe, "-d"], env={**os.environ, **daemon.env}, capture_output=True, text=True,
                                 timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            daemon._remove()
            raise MpsUnavailable(f"{CONTROL} -d failed: {e}") from e
        if run.returncode != 0:
            daemon._remove()
            raise MpsUnavailable(f"{CONTROL} -d exited {run.returncode}: {(run.stderr or run.stdout).strip()}")
        return daemon

    def stop(self) -> None:
        """Quit the daemon (it stops its server once the clients have exited) and remove its directory."""
        try:
            subprocess.run([self.exe], input="quit\n", env={**os.environ, **self.env}, capture_output=True,
                           text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            logger.warning("stopping the MPS daemon failed: %s", e)
        self._remove()

    def _remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def start_for(layout: list[WorkerSpec], mps: bool | None) -> MpsDaemon | None:
    """A daemon when workers share a GPU and mps is not False; mps None (auto) falls back to time-slicing,
    with one line saying so, where MPS cannot start; mps True makes that an error."""
    if mps is False or not shared_gpus(layout):
        return None
    try:
        return MpsDaemon.start()
    except MpsUnavailable as e:
        if mps:
            raise
        logger.warning("workers sharing %s are time-sliced (no MPS: %s)", ", ".join(shared_gpus(layout)), e)
        return None
