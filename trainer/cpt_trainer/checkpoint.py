"""Checkpoint I/O for the format in `cpt_operator.api.manifest`, through fsspec.

Layout of `<checkpoint_uri>/step-XXXXXXXX/` (the model files sit at the top, so the directory is
also an ordinary transformers model directory that `from_pretrained` loads):
    config.json, generation_config.json, model.safetensors   model (save_pretrained)
    tokenizer.json, tokenizer_config.json, ...               tokenizer
    optimizer.pt                                             AdamW state (rank 0; DDP replicates it)
    train-state.json                                         step, tokens, schedule, anomaly window
    rng-rank00000.pt, data-rank00000.json, ...               per-rank RNG and data position
    trainer-config.json                                      the resolved config of the attempt
    manifest.json                                            written LAST: sizes + sha256 of all

Commit protocol. Rank 0 clears the directory (a stale manifest first), every rank writes its
files, all ranks meet at a barrier, then rank 0 hashes what is actually stored and writes the
manifest (local: temporary name + fsync + rename; object stores: one PUT). A crash at any point
leaves either no manifest or a manifest whose checksums match: never a checkpoint that looks
valid and is not. Retention runs only after the new manifest exists and deletes a checkpoint
manifest-first, so an interrupted delete leaves an (ignored, reported) incomplete directory.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import fsspec
import torch

from cpt_operator.api.manifest import (MANIFEST, FileEntry, Lineage, Manifest, Problem,
                                       checkpoint_name, step_of, verify)

from . import distributed

log = logging.getLogger(__name__)

OPTIMIZER = "optimizer.pt"
TRAIN_STATE = "train-state.json"
CONFIG = "trainer-config.json"
PINNED = "pinned.json"
_CHUNK = 8 << 20


def rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


def data_file(rank: int) -> str:
    return f"data-rank{rank:05d}.json"


def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path.rstrip("/")


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


# ---------------------------------------------------------------------------------- reading

def digest(fs: fsspec.AbstractFileSystem, path: str) -> FileEntry:
    h, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return FileEntry(size=size, sha256=h.hexdigest())


def read_manifest(uri: str) -> Manifest:
    fs, path = _fs(uri)
    return Manifest.model_validate_json(fs.cat_file(f"{path}/{MANIFEST}"))


def problems_of(uri: str, deep: bool = True) -> tuple[Manifest | None, list[str]]:
    """The manifest of a checkpoint directory and why it is unusable (empty: usable).
    `deep` re-hashes every file; otherwise only presence and sizes are compared."""
    fs, path = _fs(uri)
    if not fs.exists(f"{path}/{MANIFEST}"):
        return None, ["no manifest.json (an incomplete or interrupted save)"]
    try:
        manifest = read_manifest(uri)
    except Exception as exc:  # unreadable or not our format: report, never trust
        return None, [f"manifest.json is unreadable: {exc}"]
    observed = {}
    for rel, want in manifest.files.items():
        full = f"{path}/{rel}"
        if fs.exists(full):
            observed[rel] = digest(fs, full) if deep else \
                FileEntry(size=fs.size(full), sha256=want.sha256)
    problems = verify(manifest, observed)
    if step_of(path) is not None and step_of(path) != manifest.step:
        problems.append(f"manifest says step {manifest.step}, the directory name differs")
    return manifest, problems


def list_checkpoints(uri: str, deep: bool = True) -> tuple[list[tuple[str, Manifest]], list[Problem]]:
    """Valid checkpoints under `uri`, oldest first, and the directories that are not valid."""
    fs, root = _fs(uri)
    if not fs.exists(root):
        return [], []
    valid, problems = [], []
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    for name in (n for n in names if step_of(n) is not None):
        manifest, why = problems_of(join(uri, name), deep)
        if manifest is None or why:
            problems.append(Problem(name, "; ".join(why)))
        else:
            valid.append((name, manifest))
    return valid, problems


def latest_valid(uri: str, stable_only: bool = False) -> tuple[str, Manifest] | None:
    valid, problems = list_checkpoints(uri)
    for problem in problems:
        log.warning("ignoring checkpoint %s: %s", problem.checkpoint, problem.reason)
    candidates = [(n, m) for n, m in valid if m.stable or not stable_only]
    return candidates[-1] if candidates else None


def read_json(uri: str, name: str) -> Any:
    fs, path = _fs(uri)
    return json.loads(fs.cat_file(f"{path}/{name}"))


def read_torch(uri: str, name: str, weights_only: bool = True) -> Any:
    fs, path = _fs(uri)
    return torch.load(io.BytesIO(fs.cat_file(f"{path}/{name}")), map_location="cpu",
                      weights_only=weights_only)


def read_bytes(uri: str, name: str) -> bytes:
    fs, path = _fs(uri)
    return fs.cat_file(f"{path}/{name}")


# ---------------------------------------------------------------------------------- writing

@contextmanager
def _staging(fs: fsspec.AbstractFileSystem, target: str) -> Iterator[str]:
    """A local directory to write into: the target itself when it is local, else a temporary
    directory whose files are uploaded when the block ends."""
    if _is_local(fs):
        yield target
        return
    with tempfile.TemporaryDirectory(prefix="cpt-ckpt-") as tmp:
        yield tmp
        for name in os.listdir(tmp):
            fs.put_file(os.path.join(tmp, name), f"{target}/{name}")


def _fsync_dir_files(directory: str, names: list[str]) -> None:
    for name in names:
        with open(os.path.join(directory, name), "rb") as f:
            os.fsync(f.fileno())


def _clear(fs: fsspec.AbstractFileSystem, target: str) -> None:
    """Remove a directory of the same name; a stale manifest goes first so no moment exists
    where an old manifest describes half-new files."""
    if fs.exists(f"{target}/{MANIFEST}"):
        log.warning("replacing existing checkpoint %s", target)
        fs.rm_file(f"{target}/{MANIFEST}")
    if fs.exists(target):
        fs.rm(target, recursive=True)


def write_json(directory: str, name: str, obj: Any) -> str:
    with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    return name


def save(uri: str, step: int, tokens: int, *, rank: int, shared: Callable[[str], None],
         per_rank: Callable[[str], None], lineage: Lineage, evals: dict[str, float],
         train_loss: float | None, stable: bool) -> str:
    """Write checkpoint `step` (collective: every rank calls it). `shared(dir)` writes rank 0's
    files into a local directory, `per_rank(dir)` this rank's own. Returns the checkpoint URI."""
    fs, root = _fs(uri)
    target = f"{root}/{checkpoint_name(step)}"
    if rank == 0:
        _clear(fs, target)
        fs.makedirs(target, exist_ok=True)
    distributed.barrier()
    with _staging(fs, target) as directory:
        before = set(os.listdir(directory)) if rank != 0 else set()
        (shared if rank == 0 else (lambda d: None))(directory)
        per_rank(directory)
        if _is_local(fs):
            mine = os.listdir(directory) if rank == 0 else sorted(set(os.listdir(directory)) - before)
            _fsync_dir_files(directory, [n for n in mine if os.path.isfile(os.path.join(directory, n))])
    distributed.barrier()
    if rank == 0:
        _commit(fs, target, step, tokens, lineage, evals, train_loss, stable)
    distributed.barrier()
    return join(uri, checkpoint_name(step))


def _commit(fs: fsspec.AbstractFileSystem, target: str, step: int, tokens: int, lineage: Lineage,
            evals: dict[str, float], train_loss: float | None, stable: bool) -> None:
    files = {}
    for full in sorted(fs.find(target)):
        rel = full[len(target) + 1:]
        if rel != MANIFEST and not rel.endswith(".tmp"):
            files[rel] = digest(fs, full)
    manifest = Manifest(step=step, tokens=tokens, lineage=lineage, files=files, evals=evals,
                        train_loss=train_loss, stable=stable,
                        created_at=dt.datetime.now(dt.timezone.utc).isoformat())
    data = manifest.model_dump_json(by_alias=True, indent=1).encode()
    if _is_local(fs):
        tmp = os.path.join(target, MANIFEST + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(target, MANIFEST))
    else:
        fs.pipe_file(f"{target}/{MANIFEST}", data)


# -------------------------------------------------------------------------------- retention

def pinned(uri: str) -> set[str]:
    """Checkpoint names the control plane pinned (last good, frontier): a JSON list of names or
    URIs, or an object whose `pinned` list or keys name them."""
    fs, root = _fs(uri)
    if not fs.exists(f"{root}/{PINNED}"):
        return set()
    doc = json.loads(fs.cat_file(f"{root}/{PINNED}"))
    names = doc.get("pinned", list(doc)) if isinstance(doc, dict) else doc
    return {str(n).rstrip("/").rsplit("/", 1)[-1] for n in names}


def prune(uri: str, keep: int, protect: set[str] = frozenset()) -> list[str]:
    """Delete valid checkpoints beyond the newest `keep`, except pinned and protected ones.
    Incomplete directories are left for a person to look at (they are reported by listing)."""
    fs, root = _fs(uri)
    valid, _ = list_checkpoints(uri, deep=False)
    spare = pinned(uri) | set(protect)
    doomed = [name for name, _ in valid[:-keep] if name not in spare] if keep > 0 else []
    for name in doomed:
        fs.rm_file(f"{root}/{name}/{MANIFEST}")
        fs.rm(f"{root}/{name}", recursive=True)
    return doomed
