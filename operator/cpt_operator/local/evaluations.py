"""Separate evaluations on this machine (`evaluation.placement: separate`): one process per
checkpoint, `python -m cpt_trainer --config C --evaluate TARGET`, beside the trainer.

Each lives in the folder of the attempt whose checkpoint it reads
(`attempt-NNN/evaluate-<target>/`: its config and log), so the next `cptctl run` of the run
directory finds one a dead runner left behind as it finds a trainer. A process that fails is
started again up to `EVALUATION_TRIES` in all; then it is reported as failed (the core says
so in the Evaluated condition). What this runner saw fail is not kept across runners: the next
`cptctl run` tries again.
"""
from __future__ import annotations

import sys
from pathlib import Path

import fsspec

from cpt_api.evaluation import EVALUATION_TRIES
from cpt_api.events import Evaluated
from cpt_api.manifest import CONFIG, attempt_folder, eval_record_name, step_of
from cpt_api.status import BASE
from cpt_api.storage import storage_options
from cpt_api.spec import CptRunSpec
from ..policy.evaluations import EvalRun
from ..reconcile import Evaluate, evaluation_config, evaluation_target
from .launcher import TrainerProcess
from .rundir import RunDir


class LocalEvaluations:
    def __init__(self, spec: CptRunSpec, run: str, run_dir: RunDir, checkpoint_root: str):
        self.spec, self.run, self.dir, self.checkpoint_root = spec, run, run_dir, checkpoint_root
        self.procs: dict[str, TrainerProcess] = {}
        self.actions: dict[str, Evaluate] = {}
        self.tries: dict[str, int] = {}
        self.failed: dict[str, str] = {}
        self.done: list[Evaluated] = []
        """Records of the evaluations that ended since `take_done` was last called."""

    def folder(self, action: Evaluate) -> Path:
        return self.dir.attempt(action.attempt) / f"evaluate-{evaluation_target(action)}"

    def start(self, action: Evaluate) -> None:
        if action.target in self.procs:
            return
        folder = self.folder(action)
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / CONFIG
        cfg = evaluation_config(action, spec=self.spec, run=self.run, run_uid=self.dir.run_id,
                                checkpoint_root=self.checkpoint_root, run_dir=str(folder))
        config.write_text(cfg.dump_json())
        command = [sys.executable, "-m", "cpt_trainer", "--config", str(config),
                   "--evaluate", evaluation_target(action)]
        self.actions[action.target] = action
        self.tries[action.target] = self.tries.get(action.target, 0) + 1
        self.failed.pop(action.target, None)
        self.procs[action.target] = TrainerProcess(command, folder / "evaluate.log")

    def runs(self) -> dict[str, EvalRun]:
        """What runs or failed; a process that failed with tries left is started again here."""
        for target, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.procs[target]
            proc.stop(0)  # reaped; closes its log
            if code == 0:
                self._read_record(self.actions[target])
                continue
            action = self.actions[target]
            why = f"exit code {code}: {_last_error(self.folder(action) / 'evaluate.log')}"
            if self.tries[target] < EVALUATION_TRIES:
                self.start(action)
            else:
                self.failed[target] = f"{why} (tried {self.tries[target]} times)"
        runs = {t: EvalRun(state="running") for t in self.procs}
        runs.update({t: EvalRun(state="failed", message=m) for t, m in self.failed.items()})
        return runs

    def _read_record(self, action: Evaluate) -> None:
        step = 0 if action.target == BASE else step_of(action.target) or 0
        path = f"{self.checkpoint_root.rstrip('/')}/{attempt_folder(action.attempt)}/{eval_record_name(step)}"
        try:
            with fsspec.open(path, "rb", **storage_options(path)) as f:
                self.done.append(Evaluated.model_validate_json(f.read()))
        except (OSError, ValueError):
            pass  # shown in status all the same; this is only the progress line

    def take_done(self) -> list[Evaluated]:
        done, self.done = self.done, []
        return done

    def stop(self, targets: tuple[str, ...] | None = None) -> None:
        for target in list(self.procs) if targets is None else targets:
            proc = self.procs.pop(target, None)
            if proc is not None:
                proc.stop(grace_s=5.0)


def _last_error(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if "Error" in ln or "error" in ln or "refused" in ln]
    return (errors or lines or ["no output"])[-1][:300]


__all__ = ["LocalEvaluations"]
