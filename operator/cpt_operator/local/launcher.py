"""Start and stop one trainer attempt on this machine (torchrun for several processes).

The trainer runs in a session of its own (a stop reaches every rank, and a Ctrl-C in the
terminal reaches the runner first, which stops the trainer after a checkpoint). On Linux it also
ends with the runner: if the runner dies, even by SIGKILL (the OOM killer), the kernel sends the
trainer (or torchrun, which passes it on to its workers) SIGTERM, so it saves and exits instead of
training on unwatched. Where that is not available, or a trainer is left anyway, the next
`cptctl run` of the same run directory finds it by its command line and ends it before starting.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal this process gets when the thread that forked it exits."""


def trainer_command(config: Path, nproc: int, max_restarts: int = 0) -> list[str]:
    """The trainer's command line; with several processes, torchrun restarts crashed ones in
    place up to `max_restarts` times (stopPolicy.maxInPlaceRestarts)."""
    if nproc == 1:
        # One process needs no rendezvous, agent or process group: fewer moving parts between
        # a stop signal and the trainer, and a faster start.
        return [sys.executable, "-m", "cpt_trainer", "--config", str(config)]
    return [sys.executable, "-m", "cpt_trainer.launch", "--standalone", f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}", "-m", "cpt_trainer", "--config", str(config)]


class TrainerProcess:
    """A trainer attempt in its own process group, so a stop reaches every rank."""

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.log = open(log_path, "ab")
        # torchrun gives each of several workers one thread itself; a single trainer keeps all.
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=child_env, start_new_session=True, preexec_fn=_ends_with(os.getpid()))

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


def _ends_with(runner: int) -> Callable[[], None] | None:
    """What the child runs before exec: SIGTERM when the runner dies (Linux); if the runner is
    already gone by then, it never starts."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != runner:
            os._exit(1)

    return arm


def strays(run_root: Path) -> list[int]:
    """Live processes of a trainer of this run directory (its attempt's config path is on their
    command line) that no runner watches: torchrun and its workers, or a lone trainer. Linux
    (/proc) only; empty elsewhere."""
    needle = f"{Path(run_root).resolve()}/attempt-".encode()
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc/self").exists() else ():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # exited meanwhile, or not ours to read
            continue
        if needle in cmdline and b"cpt_trainer" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def end_strays(pids: list[int], grace_s: float = 120.0) -> None:
    """SIGTERM to the strays' process groups (they save a checkpoint and exit), SIGKILL to what
    is left after the grace."""
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 10.0)
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.2)
        if not any(_alive(pid) for pid in pids):
            return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is no longer running
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True
