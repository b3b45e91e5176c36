"""What the trainer and evaluator processes of an action run with, for either backend, which
decides only where things are (the run directory, the checkpoint root, the metrics port).
"""
from __future__ import annotations

from cpt_api.manifest import attempt_folder
from cpt_api.spec import CptRunSpec
from cpt_api.trainer_config import TrainerConfig
from .actions import Evaluate, StartAttempt


def attempt_config(action: StartAttempt, *, spec: CptRunSpec, run: str, run_uid: str | None,
                   checkpoint_root: str, run_dir: str, namespace: str = "local",
                   metrics_port: int = 0, image: str | None = None) -> TrainerConfig:
    """What the trainer of the attempt `action` starts runs with, for either backend (which
    decides only where things are: the run directory, the checkpoint root, the metrics port)."""
    root = checkpoint_root.rstrip("/")
    return TrainerConfig(run=run, namespace=namespace, attempt=action.number, spec=spec, run_dir=run_dir,
                         run_uid=run_uid, checkpoint_root=root,
                         checkpoint_uri=f"{root}/{attempt_folder(action.number)}",
                         restore_from=f"{root}/{action.restore_from}" if action.restore_from else None,
                         restore_mode=action.restore_mode, overrides=action.overrides,
                         base_sha256=action.base_sha256, metrics_port=metrics_port, image=image)


def evaluation_config(action: Evaluate, *, spec: CptRunSpec, run: str, run_uid: str | None,
                      checkpoint_root: str, run_dir: str, namespace: str = "local",
                      image: str | None = None) -> TrainerConfig:
    """What the separate evaluation `action` runs with, for either backend: the run's spec, and
    the folder of the attempt whose checkpoint it reads and where its record goes."""
    root = checkpoint_root.rstrip("/")
    return TrainerConfig(run=run, namespace=namespace, attempt=action.attempt, spec=spec, run_dir=run_dir,
                         run_uid=run_uid, checkpoint_root=root,
                         checkpoint_uri=f"{root}/{attempt_folder(action.attempt)}", image=image)


def evaluation_target(action: Evaluate) -> str:
    """The evaluator's `--evaluate` argument: `base`, or the checkpoint's name in its attempt folder."""
    return action.target.rsplit("/", 1)[-1]
