"""Read the checkpoint store (any fsspec URL) without torch: list checkpoints, read manifests,
claim a root for a run and pin what it may still restore (the trainer uses the same two).

Layout: `<checkpoint root>/attempt-NNN/step-XXXXXXXX/` — one folder per attempt, so a rolled-back
run never writes over the immutable checkpoints of the branch it abandoned. A checkpoint is
listed only when its manifest parses and every file it names exists with the recorded size
(the trainer also checks sha256 sums before it loads one). This is the one reader of
checkpoints: the operator lists a run's root, the trainer one attempt's folder (`checkpoints_in`)
and checks one it restores (`check`), by the same rules.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
from dataclasses import dataclass
from typing import Mapping

import fsspec
from pydantic import ValidationError

from .manifest import (MANIFEST, PINNED, RUN_RECORD, FileEntry, Manifest, Problem, attempt_folder, attempt_of,
                           step_of, verify)
from .ownership import Pins, RunRecord
from .storage import storage_options


def attempt_dir(root: str, attempt: int) -> str:
    return f"{root.rstrip('/')}/{attempt_folder(attempt)}"


@dataclass(frozen=True)
class CheckpointRef:
    name: str
    """`attempt-NNN/step-XXXXXXXX`, unique within a run."""
    uri: str
    manifest: Manifest

    @property
    def attempt(self) -> int:
        return self.manifest.lineage.attempt


def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri))
    return fs, path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def put_atomic(uri: str, rel: str, data: bytes) -> None:
    """Write `<uri>/<rel>` so that a reader sees all of it or nothing (the old content until
    then). Local: temporary name + fsync + rename, since writing in place truncates first and a
    reader in between gets an empty file; object stores: one PUT (an object appears whole)."""
    fs, root = _fs(uri)
    path = f"{root.rstrip('/')}/{rel}"
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"  # two writers of one file must not share a temporary
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


_CHUNK = 8 << 20


def file_digest(fs: fsspec.AbstractFileSystem, path: str) -> FileEntry:
    """The size and sha256 of one file, read in chunks."""
    h, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return FileEntry(size=size, sha256=h.hexdigest())


def check(uri: str, deep: bool = False) -> tuple[Manifest | None, list[str]]:
    """A checkpoint folder's manifest and why the checkpoint is unusable (empty: usable)."""
    fs, path = _fs(uri)
    return _checked(fs, path.rstrip("/"), deep)


def _checked(fs: fsspec.AbstractFileSystem, path: str, deep: bool) -> tuple[Manifest | None, list[str]]:
    """Every file the manifest names must be there with its size, and with its sha256 when
    `deep` (the trainer hashes what it loads; a listing compares sizes, from one `find`); the
    folder's step must be the manifest's."""
    try:
        manifest = Manifest.model_validate_json(fs.cat_file(f"{path}/{MANIFEST}"))
    except FileNotFoundError:
        return None, ["no manifest.json (an incomplete or interrupted save)"]
    except (ValidationError, ValueError) as exc:
        return None, [f"manifest.json is unreadable: {str(exc).splitlines()[0]}"]
    observed = {}
    for full, info in fs.find(path, detail=True).items():
        rel = posixpath.relpath(full, path)
        want = manifest.files.get(rel)
        if want is None:
            continue
        size = int(info.get("size") or 0)
        observed[rel] = file_digest(fs, full) if deep and size == want.size else \
            FileEntry(size=size, sha256=want.sha256)
    problems = verify(manifest.files, observed)
    if step_of(path) is not None and step_of(path) != manifest.step:
        problems.append(f"manifest says step {manifest.step}, the directory name differs")
    return manifest, problems


def _in_folder(fs: fsspec.AbstractFileSystem, folder: str, folder_uri: str, deep: bool,
               known: Mapping[str, CheckpointRef]) -> tuple[list[CheckpointRef], list[Problem]]:
    """The checkpoints directly under one folder (an attempt's), named `<folder>/<step>`."""
    found: list[CheckpointRef] = []
    problems: list[Problem] = []
    for ckpt_path in sorted(fs.ls(folder, detail=False)):
        if step_of(ckpt_path) is None:
            continue
        name = f"{posixpath.basename(folder)}/{posixpath.basename(ckpt_path.rstrip('/'))}"
        uri = f"{folder_uri}/{posixpath.basename(ckpt_path.rstrip('/'))}"
        seen = known.get(name)
        if seen is not None and seen.uri == uri:
            found.append(seen)
            continue
        manifest, why = _checked(fs, ckpt_path.rstrip("/"), deep)
        if manifest is None or why:
            problems.append(Problem(name, "; ".join(why)))
        else:
            found.append(CheckpointRef(name, uri, manifest))
    return found, problems


def checkpoints_in(folder: str, deep: bool = False) -> tuple[list[CheckpointRef], list[Problem]]:
    """The usable checkpoints directly under `folder` (one attempt's), oldest first, and what
    was skipped; `deep` also compares every file's sha256."""
    fs, path = _fs(folder)
    fs.invalidate_cache()
    try:
        found, problems = _in_folder(fs, path.rstrip("/"), folder.rstrip("/"), deep, {})
    except FileNotFoundError:
        return [], []
    return sorted(found, key=lambda c: c.manifest.step), problems


def list_checkpoints(root: str, known: Mapping[str, CheckpointRef] | None = None
                     ) -> tuple[list[CheckpointRef], list[Problem]]:
    """Every usable checkpoint under a run's checkpoint root, oldest first, and what was skipped.

    `known`: checkpoints listed before, by name. A checkpoint is immutable once its manifest
    exists, so one still listed is taken from there without reading its manifest or sizes again;
    only the listing (which finds new checkpoints, and drops deleted ones) is redone."""
    fs, base = _fs(root)
    # Listings are cached per filesystem instance, and the trainer writes behind our back (as
    # does `claim`, whose listing of the root would otherwise hide every later attempt folder).
    fs.invalidate_cache()
    try:
        listed = fs.ls(base, detail=False)
    except FileNotFoundError:
        return [], []
    found: list[CheckpointRef] = []
    problems: list[Problem] = []
    for attempt_path in sorted(p for p in listed if attempt_of(posixpath.basename(p)) is not None):
        refs, skipped = _in_folder(fs, attempt_path, f"{root.rstrip('/')}/{posixpath.basename(attempt_path)}",
                                   False, known or {})
        found += refs
        problems += skipped
    found.sort(key=lambda c: (c.attempt, c.manifest.step))
    return found, problems


def claim(root: str, record: RunRecord) -> RunRecord:
    """The run that owns `root`: `record` if the root had no owner yet (it is written now),
    else the one recorded there. Create-if-absent, never replace. Object stores offer no
    exclusive create here, so two runs claiming one empty root in the same instant could both
    write; the read back makes the later writer see the winner and back off."""
    fs, base = _fs(root)
    fs.invalidate_cache(base)  # a listing cached before another process wrote the record
    path = f"{base}/{RUN_RECORD}"
    if not fs.exists(path):
        put_atomic(root, RUN_RECORD, record.model_dump_json(by_alias=True).encode())
        fs.invalidate_cache(base)
    return RunRecord.model_validate_json(fs.cat_file(path))


def owner(root: str) -> RunRecord | None:
    """The run recorded at `root`, without claiming it (None: no record)."""
    fs, base = _fs(root)
    try:
        return RunRecord.model_validate_json(fs.cat_file(f"{base}/{RUN_RECORD}"))
    except FileNotFoundError:
        return None


def pin(root: str, names: list[str], judged: Mapping[str, int] | None = None) -> None:
    """Replace the root's pins with `names` (`attempt-NNN/step-XXXXXXXX`) and the judged marks:
    written whole (`put_atomic`), so a reader sees the old set or the new one, never a mixture
    nor an empty file."""
    put_atomic(root, PINNED, Pins.of(names, dict(judged or {})).model_dump_json(by_alias=True).encode())


def pins(root: str) -> Pins:
    """What the control plane pinned at `root` (empty when it has pinned nothing yet)."""
    fs, base = _fs(root)
    try:
        return Pins.model_validate_json(fs.cat_file(f"{base}/{PINNED}"))
    except FileNotFoundError:
        return Pins()
