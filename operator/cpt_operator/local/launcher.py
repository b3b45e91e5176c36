"""Start and stop one trainer attempt as torchrun subprocesses on this machine."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def torchrun_command(config: Path, nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "cpt_trainer", "--config", str(config)]


class TrainerProcess:
    """A trainer attempt in its own process group, so a stop reaches every rank."""

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.log = open(log_path, "ab")
        child_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                     "PYTHONUNBUFFERED": "1", **(env or {})}
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
