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
from .skips import DataSkip

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
"""2: model and optimizer as torch.distributed.checkpoint shards (any world size can load
them); 1 (consolidated safetensors + optimizer.pt) is no longer written or read."""
_NAME = re.compile(r"^step-(\d{8})$")
_IN_ROOT = re.compile(r"^(.+)/attempt-\d{3,}/step-\d{8}/?$")

MODEL_DIR = "model"
"""Sharded model weights (DCP: `.metadata` + one `__<rank>_0.distcp` per writing rank)."""
OPTIMIZER_DIR = "optimizer"
"""Sharded AdamW state, flattened per parameter name so another world size can load it."""
TRAIN_STATE = "train-state.json"
"""step, tokens, world size, schedule, anomaly window (rank 0)."""
CONFIG = "trainer-config.json"
"""The resolved config of the attempt that wrote the checkpoint."""
PINNED = "pinned.json"
"""At the checkpoint root: what the run may still restore, which retention must keep (`Pins`)."""
RUN_RECORD = "run.json"
"""At the checkpoint root: the one run whose checkpoints live there (`RunRecord`)."""
EVALS_DIR = "evals"
"""In each attempt's folder (`<checkpoint_uri>/evals/step-XXXXXXXX.json`): one record per
evaluation, the `Evaluated` event as JSON, written once (atomically) when the evaluation is
announced. Prometheus only holds the latest value of a gauge, so two evaluations between scrapes
would hide the first; the control plane reads every evaluation from these records."""
SKIPS = "skips.json"
"""In each attempt's folder: the data windows the attempt blamed for its restores so far
(`api.skips.SKIP_LIST`), rewritten whole and atomically whenever one is found or widened. On a
cluster the operator sees anomalies only as counts in Prometheus; this file tells it which data
to skip in the attempts after a rollback."""
STARTED = "started.json"
"""In each attempt's folder: the attempt's `Started` event, written once it has verified its
start point; it carries the base's digest the run records at its first start."""
BLOCKS = "blocks.json"
"""The sha256 of every fixed-size block of every shard file (`BlockTable`), listed in the
manifest like any file: a rank restoring from the store reads only the byte ranges it needs and
verifies each block as it arrives, instead of downloading and hashing whole files first."""
MODEL_FILES = ("config.json", "generation_config.json")
"""The model's architecture at the top (with the tokenizer files), so a checkpoint says what
it holds without loading it."""


def rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.json"


def data_file(rank: int) -> str:
    return f"data-rank{rank:05d}.json"


_RANK_FILE = re.compile(r"(?:^|/)(?:__(\d+)_\d+\.distcp|[a-z]+-rank(\d{5})\.json)$")


def writer_rank(path: str) -> int:
    """The rank that writes a checkpoint file: its own shards and state files, rank 0 the rest
    (DCP metadata, config, tokenizer). Each rank hashes what it wrote; rank 0 never re-reads
    another rank's bytes to build the manifest."""
    match = _RANK_FILE.search(path)
    if match is None:
        return 0
    return int(match.group(1) or match.group(2))


_STATE_FILE = re.compile(r"^[a-z]+-rank\d{5}\.json$")


def is_model_file(rel: str) -> bool:
    """A top-level file a server needs besides the weights (config, generation config,
    tokenizer): everything at the top but the trainer's own state, the block table and the
    manifest."""
    return ("/" not in rel and rel not in (MANIFEST, TRAIN_STATE, CONFIG, BLOCKS)
            and _STATE_FILE.match(rel) is None)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def eval_record_name(step: int) -> str:
    """Path of an evaluation record, relative to the attempt's folder."""
    return f"{EVALS_DIR}/{checkpoint_name(step)}.json"


_RECORD = re.compile(r"^step-(\d{8})\.json$")


def is_eval_record(name: str) -> bool:
    """A committed record (not a temporary file of one being written)."""
    return _RECORD.match(name.rstrip("/").rsplit("/", 1)[-1]) is not None


ATTEMPT_PREFIX = "attempt-"
EVENTS = "events.jsonl"
"""In each attempt's run directory: the trainer's events, one `api.events` model a line."""


def attempt_folder(attempt: int) -> str:
    """One folder per attempt under the run's checkpoint root (and the run directory), so a
    rolled-back run never writes over the immutable checkpoints of the branch it abandoned."""
    return f"{ATTEMPT_PREFIX}{attempt:03d}"


def attempt_of(name: str) -> int | None:
    """The attempt a folder name (`attempt-NNN`, the last path part) or checkpoint name
    (`attempt-NNN/step-XXXXXXXX`) belongs to; None for any other name."""
    parts = [p for p in name.rstrip("/").split("/") if p]
    for part in reversed(parts):
        if part.startswith(ATTEMPT_PREFIX) and part[len(ATTEMPT_PREFIX):].isdigit():
            return int(part[len(ATTEMPT_PREFIX):])
    return None


def root_of(checkpoint_uri: str) -> str | None:
    """The run root a checkpoint `<root>/attempt-NNN/step-XXXXXXXX` lives under (None: another layout)."""
    match = _IN_ROOT.match(checkpoint_uri)
    return match.group(1) if match else None


def step_of(name: str) -> int | None:
    match = _NAME.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


class FileEntry(SpecModel):
    size: int
    sha256: str


class FileBlocks(SpecModel):
    block_size: int
    sha256: list[str]
    """sha256 of bytes `[i·blockSize, (i+1)·blockSize)` for each block i (the last one shorter)."""


class BlockTable(SpecModel):
    files: dict[str, FileBlocks]
    """Relative path -> its blocks."""


MIN_BLOCK = 64 << 10
MAX_BLOCK = 16 << 20
"""16 MiB: a good size of a ranged GET on object stores, and a table of 64 bytes a block
(4 MB for a 1 TB checkpoint)."""


def block_size_for(size: int) -> int:
    """The block size of a file of `size` bytes: about 32 blocks a file, a power of two between
    64 KiB and 16 MiB. A rank that needs a few bytes of another rank's file (a replicated scalar
    DCP wrote once) reads one block of it, which must be small against its own shards."""
    block = MIN_BLOCK
    while block < MAX_BLOCK and block * 32 < size:
        block *= 2
    return block


class Lineage(SpecModel):
    run: str
    run_uid: str | None = None
    """The owning run's identity (the CptRun's UID, a local run's id), as in `run.json`."""
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
    skips: list[DataSkip] = Field(default_factory=list)
    """Data windows skipped on the way to this checkpoint (given by the control plane, or found
    by this attempt): a restore from here or from an earlier checkpoint must skip them too."""
    eval_digests: dict[str, str] = Field(default_factory=dict)
    """Suite name -> sha256 of the suite as evaluated (its settings but name and uri, and every
    sample read): two checkpoints whose digests agree were measured on the same evaluation."""
    code_version: str = ""
    """The trainer that wrote this: its package version and, on a cluster, its image."""


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


def verify(files: dict[str, FileEntry], observed: dict[str, FileEntry]) -> list[str]:
    """Why the files on disk do not match a manifest's entries (empty list: they do)."""
    problems = []
    for path, want in sorted(files.items()):
        got = observed.get(path)
        if got is None:
            problems.append(f"{path} is missing")
        elif got.size != want.size:
            problems.append(f"{path} has {got.size} bytes, manifest says {want.size}")
        elif got.sha256 != want.sha256:
            problems.append(f"{path} sha256 {got.sha256[:12]}… differs from manifest {want.sha256[:12]}…")
    return problems
