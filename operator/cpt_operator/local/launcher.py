"""Start and stop one trainer attempt on this machine (torchrun for several processes)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def trainer_command(config: Path, nproc: int) -> list[str]:
    if nproc == 1:
        # One process needs no rendezvous, agent or process group: fewer moving parts between
        # a stop signal and the trainer, and a faster start.
        return [sys.executable, "-m", "cpt_trainer", "--config", str(config)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "cpt_trainer", "--config", str(config)]


class TrainerProcess:
    """A trainer attempt in its own process group, so a stop reaches every rank."""

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.log = open(log_path, "ab")
        # torchrun gives each of several workers one thread itself; a single trainer keeps all.
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=child_env, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self, grace_s: float = 120.0) -> int:
        """SIGTERM: the trainer saves a consistent checkpoint and exits; SIGKILL after the grace."""
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while self.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            if self.proc.poll() is None:
                self._signal(signal.SIGKILL)
        code = self.proc.wait()
        self.log.close()
        return code

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
