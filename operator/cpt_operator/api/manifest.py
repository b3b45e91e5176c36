"""The checkpoint format: names, the manifest, and what makes a checkpoint usable.

A checkpoint is a directory `<checkpoint_uri>/step-<8 digits>/` holding the state files and a
`manifest.json` written last. The manifest is the commit point: a directory without one, or
whose files do not match the sizes and sha256 sums it lists, does not exist as a checkpoint.
(Renames are not atomic on object stores, so we never rely on one.)

This module is pure: callers pass in what they read, so the trainer (torch) and the operator
(no torch) share one definition.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import Field

from .base import SpecModel

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(name: str) -> int | None:
    match = _NAME.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


class FileEntry(SpecModel):
    size: int
    sha256: str


class Lineage(SpecModel):
    run: str
    attempt: int
    parent: str | None
    """Checkpoint this one descends from (URI), or None when it descends from the base."""
    base_uri: str
    base_sha256: str | None = None
    restore_mode: str
    """How the attempt that wrote this started: weightsOnly or fullState."""
    data_version: str
    tokenizer_hash: str
    config_hash: str
    overrides: dict[str, float] = Field(default_factory=dict)


class Manifest(SpecModel):
    format_version: int = FORMAT_VERSION
    step: int
    tokens: int
    created_at: str
    lineage: Lineage
    files: dict[str, FileEntry]
    """Relative path -> size and digest, for every file of the checkpoint but the manifest."""
    evals: dict[str, float] = Field(default_factory=dict)
    """`suite.metric` -> value measured on this checkpoint."""
    train_loss: float | None = None
    stable: bool = True
    """False when anomalies were seen since the previous checkpoint (not a restore target for
    the trainer's own anomaly recovery)."""


@dataclass(frozen=True)
class Problem:
    checkpoint: str
    reason: str


def verify(manifest: Manifest, observed: dict[str, FileEntry]) -> list[str]:
    """Why the files on disk do not match the manifest (empty list: they do)."""
    problems = []
    for path, want in sorted(manifest.files.items()):
        got = observed.get(path)
        if got is None:
            problems.append(f"{path} is missing")
        elif got.size != want.size:
            problems.append(f"{path} has {got.size} bytes, manifest says {want.size}")
        elif got.sha256 != want.sha256:
            problems.append(f"{path} sha256 {got.sha256[:12]}… differs from manifest {want.sha256[:12]}…")
    return problems
