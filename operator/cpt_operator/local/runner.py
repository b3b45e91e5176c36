"""`cptctl run`: drive one CptRun to its end on this machine.

The loop is the operator's, with local hands: observe (trainer processes, event logs,
checkpoints) -> reconcile (pure, shared with the operator) -> carry out the plan (start or stop
torchrun, pin checkpoints) -> persist status. Ctrl-C stops the trainer after a consistent
checkpoint; running the same command again resumes from it.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path


from cpt_api import CptRun, CptRunSpec, InvalidSpec, TrainerConfig, load_run
from cpt_api.manifest import CONFIG
from cpt_api.ownership import RunRecord, owner_problem
from cpt_api.status import BASE, TERMINAL_PHASES, Phase
from cpt_api.store import claim, pin
from ..base_shape import ShapeUnavailable, read_shape
from ..checkpoint_report import base_to_chosen
from ..planning import resized
from ..policy.model_shape import ModelShape
from ..policy.start_checks import check_root, check_start, pin_failure, pins_hold
from ..reconcile import (Emit, Evaluate, Pin, Plan, StartAttempt, StopAttempt, StopEvaluations, attempt_config,
                         reconcile)
from .evaluations import LocalEvaluations
from .launcher import TrainerProcess, end_strays, strays, trainer_command
from .observe import LocalObserver
from .progress import Progress
from .rundir import RunDir

POLL_S = 0.5


class RunError(Exception):
    """A problem the user must fix; printed without a traceback."""


class LocalRun:
    def __init__(self, run: CptRun, run_dir: RunDir, nproc: int, progress: Progress):
        self.run, self.spec, self.dir, self.nproc = run, run.spec, run_dir, nproc
        self.checkpoint_root = self.spec.checkpoint.uri or run_dir.checkpoints
        self.observer = LocalObserver(run_dir, self.checkpoint_root)
        self.proc: TrainerProcess | None = None
        self.progress = progress
        self.pinned: Pin | None = None
        """The pins last written (written again only when they change)."""
        self.held: str | None = None
        """Why the plan waits for its pins (noted once while it lasts)."""
        self.evaluations = LocalEvaluations(self.spec, run.metadata.name, run_dir, self.checkpoint_root)

    def claim(self) -> None:
        """Take the checkpoint root before the first attempt; another run's root is refused."""
        record = RunRecord(uid=self.dir.run_id, name=self.run.metadata.name)
        refusal = check_root(owner_problem(self.checkpoint_root, claim(self.checkpoint_root, record), record))
        if refusal is not None:
            raise RunError(f"{refusal.message} (this run's directory: {self.dir.root})")

    # -- carrying out a plan ---------------------------------------------------------------
    def trainer_config(self, action: StartAttempt) -> TrainerConfig:
        return attempt_config(action, spec=self.spec, run=self.run.metadata.name, run_uid=self.dir.run_id,
                              checkpoint_root=self.checkpoint_root, run_dir=str(self.dir.attempt(action.number)))

    def start(self, action: StartAttempt) -> None:
        folder = self.dir.attempt(action.number)
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / CONFIG
        config.write_text(self.trainer_config(action).dump_json())
        self.proc = TrainerProcess(trainer_command(config, self.nproc, self.spec.stop_policy.max_in_place_restarts),
                                   folder / "trainer.log")

    def write_pins(self, plan: Plan) -> bool:
        """The plan's pins, written before anything that prunes by them; False: the plan waits
        for them (`policy.start_checks.pins_hold`) and the next pass tries again."""
        pins = next((a for a in plan.actions if isinstance(a, Pin)), None)
        refused = None
        if pins is not None and pins != self.pinned:
            try:
                pin(self.checkpoint_root, list(pins.names), dict(pins.judged))
                self.pinned = pins
            except OSError as exc:
                refused = pin_failure(pins.names, exc)
        hold = pins_hold(refused) if plan.prunes else None
        if hold is not None and hold.message != self.held:
            self.progress.note(f"[{hold.reason.value}] {hold.message}")
        self.held = hold.message if hold is not None else None
        return hold is None

    def carry_out(self, plan: Plan) -> None:
        if not self.write_pins(plan):
            return
        for action in plan.actions:
            if isinstance(action, StopAttempt) and self.proc is not None:
                self.progress.note(f"stopping attempt {action.number}: {action.reason}")
                self.proc.stop(grace_s=120.0 if action.checkpoint else 0.0)
                self.proc = None
            elif isinstance(action, StartAttempt):
                self.start(action)
            elif isinstance(action, Emit):
                self.progress.note(f"[{action.reason}] {action.message}")
            elif isinstance(action, Evaluate):
                self.progress.note(f"evaluating {action.target} in a separate process")
                self.evaluations.start(action)
            elif isinstance(action, StopEvaluations):
                self.evaluations.stop(action.targets)
        self.dir.write_status(plan.status)

    # -- the loop --------------------------------------------------------------------------
    def step(self, *, resume: bool = False, stop: bool = False) -> Plan:
        status = self.dir.read_status()
        rollback = self.dir.take_request("rollback")
        stop = stop or self.dir.take_request("stop") is not None
        obs = self.observer.observe(status.attempt, self.proc, stop=stop, resume=resume,
                                    rollback_to=rollback["to"] if rollback else None,
                                    evaluations=self.evaluations.runs())
        plan = reconcile(self.spec, status, obs)
        ended = self.observer.log(status.attempt).last_eval if status.attempt else None
        if ended is not None and plan.status.attempt != status.attempt:
            # the evaluation that ended the attempt (a gate firing) is shown before the decision
            self.progress.evaluation(plan.status, ended)
        self.carry_out(plan)
        for record in self.evaluations.take_done():  # separate evaluations have no trainer log
            self.progress.evaluation(plan.status, record)
        self.progress.update(plan.status, self.observer.log(plan.status.attempt) if plan.status.attempt else None)
        return plan

    def loop(self, resume: bool) -> Phase:
        plan = self.step(resume=resume)
        while plan.status.phase not in TERMINAL_PHASES or (self.proc and self.proc.poll() is None):
            time.sleep(POLL_S)
            plan = self.step()
        return plan.status.phase

    def interrupt(self) -> None:
        """Ctrl-C: the trainer saves a consistent checkpoint, the run is marked Stopped."""
        self.progress.note("interrupted: saving a checkpoint before stopping...")
        self.evaluations.stop()
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
        status = self.dir.read_status()
        if status.phase not in TERMINAL_PHASES:
            status.phase, status.message = Phase.stopped, "interrupted; run again to resume"
            self.dir.write_status(status)


def _prepare_dir(run: CptRun, file: str, run_dir: str | None, fresh: bool) -> tuple[RunDir, bool]:
    """Create or reopen the run directory; returns it and whether this is a resume."""
    root = Path(run_dir or Path("runs") / run.metadata.name)
    if fresh and root.exists():
        aside = root.with_name(f"{root.name}.{int(time.time())}")
        root.rename(aside)
        print(f"moved the previous run directory to {aside}")
    rd = RunDir(root)
    if rd.spec_file.exists():
        previous = load_run(rd.spec_file)
        if previous.spec.base_model != run.spec.base_model:
            raise RunError(f"{rd.root} belongs to a run with another base model; use --fresh or another --run-dir")
        status = rd.read_status()
        if status.phase in {Phase.succeeded, Phase.failed}:
            raise RunError(f"run {run.metadata.name} already ended: {status.phase.value} ({status.message}); "
                           "use --fresh to start over")
        if status.phase in {Phase.running, Phase.rolling_back}:
            # the previous runner died without stopping cleanly: continue from the last checkpoint
            status.phase, status.message = Phase.stopped, "runner exited unexpectedly"
            rd.write_status(status)
        resumed = True
    else:
        rd.root.mkdir(parents=True, exist_ok=True)
        resumed = False
    shutil.copyfile(file, rd.spec_file)
    return rd, resumed


def _lock(rd: RunDir) -> None:
    if rd.lock_file.exists():
        try:
            pid = int(rd.lock_file.read_text())
            os.kill(pid, 0)
            raise RunError(f"run directory {rd.root} is in use by process {pid}")
        except (ValueError, ProcessLookupError):
            pass
    rd.lock_file.write_text(str(os.getpid()))


def run_local(file: str, *, run_dir: str | None = None, nproc: int | None = None, fresh: bool = False,
              progress: bool = True) -> int:
    try:
        run = load_run(file)
    except InvalidSpec as exc:
        print(f"{file}: invalid CptRun:\n  " + "\n  ".join(str(e) for e in exc.errors), file=sys.stderr)
        return 2
    layout, unlaid = _on_this_machine(run.spec, nproc)
    check = check_start(layout, LocalProbe(unlaid))
    if check.memory is not None and not check.memory.planned:
        print(f"warning: {check.memory.message}", file=sys.stderr)
    if check.refusal is not None:
        print(f"{file}: not started: {check.refusal.message}", file=sys.stderr)
        return 2
    try:
        rd, resumed = _prepare_dir(run, file, run_dir, fresh)
        _lock(rd)
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    left = strays(rd.root)
    if left:  # a trainer of a runner that died: it would write beside the next attempt
        print(f"ending a trainer the previous runner left running (pids {', '.join(map(str, left))}): "
              "it saves a checkpoint first", file=sys.stderr)
        end_strays(left)
    procs = nproc or run.spec.resources.procs_per_node
    display = Progress(run.spec, enabled=progress, world_size=procs)
    local = LocalRun(run, rd, procs, display)
    try:
        local.claim()
    except RunError as exc:
        rd.lock_file.unlink(missing_ok=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    display.note(f"{'resuming' if resumed else 'starting'} run {run.metadata.name} in {rd.root}")
    try:
        phase = local.loop(resume=resumed)
    except KeyboardInterrupt:
        local.interrupt()
        display.close()
        print(f"stopped. Resume with: cptctl run {file}" + (f" --run-dir {run_dir}" if run_dir else ""))
        return 130
    finally:
        rd.lock_file.unlink(missing_ok=True)
    display.close()
    return _report(rd, phase, run.spec)


class LocalProbe:
    """The local runner's answers to the start checks (`policy.start_checks`): one machine has no
    platform allow-lists and no queue; the base is read where the trainer will read it."""

    def __init__(self, unlaid: str | None = None):
        self.unlaid = unlaid
        """Why the spec could not be laid out on this machine (its memory is then not planned)."""

    def tenancy_refusals(self, spec: CptRunSpec) -> list[str]:
        return []

    def base_shape(self, spec: CptRunSpec) -> ModelShape | str:
        if self.unlaid is not None:
            return self.unlaid
        try:
            return read_shape(spec.base_model)
        except ShapeUnavailable as exc:
            return str(exc)

    def queue_installed(self) -> bool:
        return True  # nothing queues a local run


def _on_this_machine(spec: CptRunSpec, nproc: int | None) -> tuple[CptRunSpec, str | None]:
    """The spec on this machine's layout (one node, `nproc` processes), what the memory checks
    plan against; or the spec as given and why it cannot be laid out so (hsdp on one node, say)."""
    gpus = spec.resources.gpus_per_node > 0
    try:
        return resized(spec, nodes=1, gpus_per_node=nproc if gpus else None,
                       nproc_per_node=None if gpus else nproc), None
    except ValueError as exc:
        return spec, str(exc)


def _report(rd: RunDir, phase: Phase, spec: CptRunSpec) -> int:
    status = rd.read_status()
    print(f"run {phase.value}: {status.message}")
    if status.best_checkpoint == BASE:
        print(f"no improvement: {status.verdict or 'no checkpoint is better than the base'}")
    elif status.base_metrics and status.best_checkpoint:
        chosen = next((c for c in status.checkpoints if c.name == status.best_checkpoint), None)
        if chosen:
            print(f"base -> chosen checkpoint {chosen.name}:")
            for line in base_to_chosen(spec, status.base_metrics, chosen.metrics):
                print(f"  {line}")
    print(f"status: {rd.status_file}")
    return 0 if phase == Phase.succeeded else 1


__all__ = ["run_local", "RunError"]
