"""Running a program the model wrote, in a process of its own that can do little harm.

Code suites (`pass_at_1`) execute each generated program with its tests. Never in the trainer:
each runs as `python -I` in a fresh process with

- limits: wall time (`code.timeoutSeconds`, then its process group is killed), CPU time, address
  space (`code.memory`), file size (16 MiB) and no core files, set in the child before any of the
  program's code runs;
- no network: a network namespace of its own when the kernel lets an unprivileged process make
  one (user + network namespace: only a loopback that is down), and in any case an audit hook,
  installed before the program runs and impossible to remove from Python, that refuses sockets,
  new processes (subprocess, os.system, exec, fork, spawn), ctypes and writes outside its
  scratch directory;
- a scratch directory as working directory, HOME and TMPDIR, removed afterwards, and an
  environment of PATH and LANG only: no credentials of the trainer (AWS_*, tokens) reach it.

The audit hook is the part that works everywhere: a pod under the restricted Pod Security
profile (its default seccomp profile) may not create namespaces, and then only the hook and the
limits stand between the program and the pod. It is a barrier against what a model writes by
mistake, not against a program written to escape (CPython's own documentation says as much of
audit hooks); for adversarial code, run code suites in a gVisor or Kata runtime class.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

FILE_BYTES = 16 << 20

_GUARD = r'''
import ctypes, os, resource, sys
scratch, memory, cpu = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (%d, %d))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
try:  # a user + network namespace of its own: no interface but a loopback that is down
    isolated = ctypes.CDLL(None, use_errno=True).unshare(0x10000000 | 0x40000000) == 0
except Exception:
    isolated = False
source = open(os.path.join(scratch, "program.py")).read()
REFUSED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.fork", "os.forkpty",
           "ctypes.", "pty.", "os.kill", "os.killpg", "signal.pthread_kill")
CHANGES = ("os.remove", "os.rmdir", "os.rename", "shutil.rmtree", "os.chmod", "os.chown", "os.mkdir",
           "os.symlink", "os.link", "os.truncate")
def inside(path):
    if not isinstance(path, (str, bytes)):
        return False
    path = os.path.realpath(os.fsdecode(path))
    return path == scratch or path.startswith(scratch + os.sep)
def guard(event, args):
    if event.startswith(REFUSED):
        raise PermissionError(f"sandbox: {event} is not allowed")
    writes = event == "open" and args[1] is not None and args[1] != "r" and not isinstance(args[0], int)
    if (writes or event in CHANGES) and not inside(args[0]):
        raise PermissionError(f"sandbox: {event} {args[0]!r} outside the scratch directory is not allowed")
sys.addaudithook(guard)
sys.argv = ["program.py"]
exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
''' % (FILE_BYTES, FILE_BYTES)


@dataclass(frozen=True)
class Limits:
    timeout_s: float
    memory_bytes: int


@dataclass(frozen=True)
class Outcome:
    passed: bool
    reason: str
    """`passed`, `timeout`, or the last line the program wrote to stderr."""


def run_program(source: str, limits: Limits) -> Outcome:
    """Run `source` in the sandbox; it passes when it exits 0 within the limits."""
    with tempfile.TemporaryDirectory(prefix="cpt-sandbox-") as scratch:
        scratch = os.path.realpath(scratch)
        with open(os.path.join(scratch, "program.py"), "w") as f:
            f.write(source)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": scratch, "TMPDIR": scratch}
        cpu = max(1, math.ceil(limits.timeout_s))
        proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", _GUARD, scratch, str(limits.memory_bytes),
                                 str(cpu)], cwd=scratch, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Outcome(False, "timeout")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if proc.returncode == 0:
        return Outcome(True, "passed")
    lines = err.decode(errors="replace").strip().splitlines()
    return Outcome(False, lines[-1][:200] if lines else f"exit code {proc.returncode}")
