"""The resolved config one trainer attempt runs with: the spec plus what the control plane
decided for this attempt (restore point, LR / replay overrides, where to write).

It is saved in every checkpoint, so any checkpoint says exactly how it was produced.
"""
from __future__ import annotations

from pydantic import Field

from .base import SpecModel
from .spec import CptRunSpec, RestoreMode
from .status import Overrides


class TrainerConfig(SpecModel):
    run: str
    """Run name (metric label, checkpoint lineage)."""
    namespace: str = "local"
    attempt: int = Field(default=1, ge=1)
    spec: CptRunSpec
    run_dir: str
    """Where logs, curation reports and evaluation results go."""
    checkpoint_uri: str
    """Where this attempt writes its checkpoints: `<checkpoint_root>/attempt-NNN`."""
    checkpoint_root: str | None = None
    """The run's checkpoint root (spec.checkpoint.uri or <runDir>/checkpoints), holding
    run.json and pinned.json; None for a trainer started on its own (no owner, no pins)."""
    run_uid: str | None = None
    """The run's identity: the trainer refuses a checkpoint root that run.json gives to another."""
    restore_from: str | None = None
    """Checkpoint URI to start from; None starts from the base model."""
    restore_mode: RestoreMode | None = None
    """How to restore `restoreFrom`; None means the spec's baseModel.restoreMode. The control
    plane sets fullState to continue a run (resume, rollback to a checkpoint) and weightsOnly to
    start over from the base."""
    overrides: Overrides = Field(default_factory=Overrides)
    base_sha256: str | None = None
    """The base's digest the run recorded at its first start (status.baseSha256): a base whose
    bytes now differ is refused. None on the first start, which records it."""
    image: str | None = None
    """The container image the attempt runs in, as the operator set it (cluster runs): recorded
    in each checkpoint's lineage with the trainer's version."""
    metrics_port: int = Field(default=0, ge=0, le=65535)
    """Port of rank 0's Prometheus endpoint; 0 = pick a free one and write it to the run dir."""

    def dump_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True, indent=2)
