"""Who owns a checkpoint root, and what in it must survive retention.

Two small JSON files at the root of a run's checkpoints, shared by the control plane (which
writes them) and the trainer (which reads them before it writes, prunes or restores):

- `run.json` (`RunRecord`): the run the root belongs to. Written once, before the first attempt
  starts, and never replaced: a second run pointing at the same root (the same
  `checkpoint.uri`, or a run deleted and created again under the same name, which gets a new
  UID) is refused instead of clearing, pruning or restoring the first run's checkpoints.
- `pinned.json` (`Pins`): every checkpoint the run may still restore (the current attempt's
  restore point, the last good one, the chosen one, the Pareto frontier), and how far the
  control plane has judged each attempt folder. Written by the control plane before it starts
  an attempt and whenever either changes; retention deletes only checkpoints the control plane
  has judged and not pinned, so a checkpoint that may become the last good one is never
  deleted before the control plane has seen it.

Pure: callers do the reading and writing (`cpt_api.store`).
"""
from __future__ import annotations

from collections.abc import Iterable

from pydantic import Field

from .base import SpecModel


class RunRecord(SpecModel):
    uid: str
    """The CptRun's metadata.uid, or the id a local run keeps in its run directory."""
    name: str
    namespace: str = "local"

    def describe(self) -> str:
        return f"run {self.namespace}/{self.name} (uid {self.uid})"


def owner_problem(root: str, owner: RunRecord, claimant: RunRecord) -> str | None:
    """Why `claimant` may not use the checkpoint root `owner` claimed (None: it owns it). The
    owner is named only to a run of its own namespace: on a shared cluster the message reaches
    the claimant's status and events, and which team's run a location holds is not theirs to see."""
    if owner.uid == claimant.uid:
        return None
    whose = owner.describe() if owner.namespace == claimant.namespace else "another run"
    return (f"checkpoint.uri {root} is taken: it belongs to {whose}, whose checkpoints it may still "
            "restore; give this run its own checkpoint.uri")


def import_problem(base: str, owner: RunRecord, claimant: RunRecord, imported: bool) -> str | None:
    """Why `claimant` may not start from checkpoint `base`, which `owner`'s root holds (None: it
    owns it, or its spec imports it). Naming a URI is not enough to read another run's weights."""
    if owner.uid == claimant.uid or imported:
        return None
    whose = owner.describe() if owner.namespace == claimant.namespace else "another run"
    return (f"baseModel {base} is a checkpoint of {whose}; a run starts from another run's checkpoint "
            "only when its spec says so (baseModel.importCheckpoint: true)")


class Pins(SpecModel):
    names: list[str] = Field(default_factory=list)
    """Checkpoints retention must keep, as `attempt-NNN/step-XXXXXXXX` under the root."""

    judged: dict[str, int] = Field(default_factory=dict)
    """By attempt folder (`attempt-NNN`): the newest step whose checkpoint the control plane has
    seen and weighed when it wrote these pins. A checkpoint above it is kept by retention."""

    @classmethod
    def of(cls, names: Iterable[str | None], judged: dict[str, int] | None = None) -> "Pins":
        return cls(names=sorted({n for n in names if n}), judged=dict(judged or {}))

    def judged_through(self, folder: str) -> int:
        """The newest judged step in `folder`; -1 when none is (retention keeps them all)."""
        return self.judged.get(folder.strip("/"), -1)

    def steps_in(self, folder: str) -> set[str]:
        """The pinned checkpoint names (`step-XXXXXXXX`) inside one attempt folder."""
        prefix = folder.strip("/") + "/"
        return {n[len(prefix):] for n in self.names if n.startswith(prefix)}
