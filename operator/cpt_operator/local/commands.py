"""`cptctl status | stop | rollback | checkpoints | export` for local runs (run directories)."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from cpt_api.manifest import ATTEMPT_PREFIX, step_of
from cpt_api.status import BASE
from ..policy.cadence import advice
from .rundir import RunDir


def _open(run: str) -> RunDir | None:
    try:
        return RunDir.find(run)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def show_status(run: str, *, as_json: bool = False) -> int:
    rd = _open(run)
    if rd is None:
        return 2
    status = rd.read_status()
    if as_json:
        print(status.model_dump_json(by_alias=True, exclude_none=True, indent=2))
        return 0
    print(status.describe(rd.root.name))
    from cpt_api import load_run

    line = advice(status, load_run(rd.spec_file).spec.checkpoint.every) if rd.spec_file.exists() else None
    if line:
        print(line)
    return 0


def request_stop(run: str) -> int:
    rd = _open(run)
    if rd is None:
        return 2
    rd.request("stop", {"by": "cptctl"})
    print(f"stop requested for {rd.root.name}; the runner stops after a consistent checkpoint")
    return 0


def request_rollback(run: str, to: str) -> int:
    rd = _open(run)
    if rd is None:
        return 2
    rd.request("rollback", {"to": to})
    print(f"rollback to {to} requested for {rd.root.name}")
    return 0


def show_checkpoints(run: str, *, plot: str | None = None, as_json: bool = False) -> int:
    rd = _open(run)
    if rd is None:
        return 2
    status = rd.read_status()
    if as_json:
        print(json.dumps([c.dump() for c in status.checkpoints], indent=2))
        return 0
    from cpt_api import load_run
    from ..checkpoint_report import render_report  # matplotlib only when asked for

    spec = load_run(rd.spec_file).spec if rd.spec_file.exists() else None
    print(render_report(status, plot=plot, spec=spec))
    return 0


def export_source(run: str, checkpoint: str | None) -> list[str]:
    """What `cptctl export RUN [CHECKPOINT]` exports, as arguments of the export tool.

    RUN is a checkpoint itself (a URI such as s3://bucket/prefix/step-00000012, or a directory
    named step-XXXXXXXX: how a cluster run's checkpoints are reached) or a local run. For a run,
    CHECKPOINT is a URI or path, a name (`attempt-NNN/step-XXXXXXXX`, or `step-XXXXXXXX` in the
    latest attempt that has it) or, by default, the checkpoint the run chose, else its newest
    valid one; a run that chose the base (nothing beat it) has nothing to export by default.
    Raises ValueError or FileNotFoundError with a message for a person."""
    if _is_checkpoint(run):
        if checkpoint:
            raise ValueError(f"{run} is a checkpoint already; give either it or RUN CHECKPOINT")
        return [run]
    rd = RunDir.find(run)
    if checkpoint and ("://" in checkpoint or Path(checkpoint).is_dir()):
        return [checkpoint]
    if checkpoint and "/" in checkpoint:
        return [str(Path(rd.checkpoints) / checkpoint), "--why", f"{checkpoint} of {rd.root.name}"]
    if checkpoint:
        found = sorted(Path(rd.checkpoints).glob(f"{ATTEMPT_PREFIX}*/{checkpoint}"))
        if not found:
            raise FileNotFoundError(f"no checkpoint {checkpoint} in {rd.checkpoints}")
        return [str(found[-1]), "--why", f"{found[-1].parent.name}/{checkpoint} of {rd.root.name}"]
    status = rd.read_status()
    chosen = status.best_checkpoint
    if chosen == BASE:
        raise ValueError(f"{rd.root.name} chose no checkpoint: none is better than the base ({status.verdict}). "
                         "The base itself is the model to use; to export a checkpoint anyway, name it "
                         "(cptctl export RUN attempt-NNN/step-XXXXXXXX)")
    if chosen:
        return [str(Path(rd.checkpoints) / chosen), "--why", f"chosen by {rd.root.name}: {chosen}"]
    return ["--latest-under", rd.checkpoints]


def _is_checkpoint(where: str) -> bool:
    return "://" in where or step_of(where) is not None


@dataclass(frozen=True)
class LocalCommands:
    """`cptctl status | stop | resume | rollback` for a run directory on this machine."""

    run: str

    def show_status(self, as_json: bool = False) -> int:
        return show_status(self.run, as_json=as_json)

    def request_stop(self) -> int:
        return request_stop(self.run)

    def request_resume(self) -> int:
        print(f"error: {self.run} is a local run: `cptctl run FILE` resumes it", file=sys.stderr)
        return 2

    def request_rollback(self, to: str) -> int:
        return request_rollback(self.run, to)
