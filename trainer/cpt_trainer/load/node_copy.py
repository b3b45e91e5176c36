"""A remote base (or tokenizer) copied once per node, hashed while it downloads.

Every rank of a node asks for the copy; the first takes the node's lock and downloads, the others
wait on the lock (not on a collective, whose timeout a 140 GB download would outlast) and then
find the record. Each file goes to a temporary name, is hashed on the way and renamed into
place; the record (`<copy>.verified.json`: every file's size and sha256, and the digest of the
whole) is written last, so a copy without its record is never used: an interrupted download is
done again. A later start re-checks the sizes against the record (a truncated file is fetched
again) and takes the digest from it instead of hashing the base a second time.

The digest of a base is the sha256 of the file (GGUF) or, for a directory, the sha256 over the
sorted `name:sha256` lines of its files: stable across copies, sensitive to any byte.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
from pathlib import Path

import fsspec

from ..node_cache import locked, node_cache

log = logging.getLogger(__name__)

_CHUNK = 8 << 20
RECORD_SUFFIX = ".verified.json"


def is_local(uri: str) -> bool:
    fs, _ = fsspec.core.url_to_fs(uri)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def copy_path(uri: str) -> Path:
    """Where this node keeps its copy of remote `uri`."""
    _, path = fsspec.core.url_to_fs(uri)
    return node_cache("remote", hashlib.sha256(uri.encode()).hexdigest()[:16], Path(path).name)


def local_copy(uri: str) -> str:
    """A local path holding `uri`: itself when local, else this node's verified copy."""
    if is_local(uri):
        path: str = fsspec.core.url_to_fs(uri)[1]
        return path
    return str(_ensure_copy(uri)[0])


def base_digest(uri: str) -> str:
    """The digest of the base at `uri`: the copy's record for a remote base (hashed while it
    downloaded), else a hash of the local files."""
    if is_local(uri):
        return digest(fsspec.core.url_to_fs(uri)[1])
    return _ensure_copy(uri)[1]


def _ensure_copy(uri: str) -> tuple[Path, str]:
    target = copy_path(uri)
    record = target.with_name(target.name + RECORD_SUFFIX)
    with locked(str(target.with_name(target.name + ".lock"))):
        files = _intact(target, record)
        if files is None:
            log.info("copying %s to %s (once for this node)", uri, target)
            record.unlink(missing_ok=True)
            files = _download(uri, target)
            _write_json(record, {"files": files, "digest": _digest_of(target, files)})
        return target, _digest_of(target, files)


def _intact(target: Path, record: Path) -> dict[str, dict[str, int | str]] | None:
    """The record's files when every one is there with its recorded size, else None."""
    try:
        files: dict[str, dict[str, int | str]] = json.loads(record.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for rel, entry in files.items():
        path = target / rel if rel else target
        if not path.is_file() or path.stat().st_size != entry["size"]:
            return None
    return files


def _download(uri: str, target: Path) -> dict[str, dict[str, int | str]]:
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    if fs.isdir(root):
        sources = {posixpath.relpath(p, root): p for p in fs.find(root)}
    else:
        sources = {"": root}
    files = {}
    for rel, source in sorted(sources.items()):
        files[rel] = _fetch_file(fs, source, target / rel if rel else target)
    return files


def _fetch_file(fs: fsspec.AbstractFileSystem, source: str, dest: Path) -> dict[str, int | str]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    h, size = hashlib.sha256(), 0
    with fs.open(source, "rb") as src, open(tmp, "wb") as out:
        while chunk := src.read(_CHUNK):
            h.update(chunk)
            out.write(chunk)
            size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, dest)
    return {"size": size, "sha256": h.hexdigest()}


def _digest_of(target: Path, files: dict[str, dict[str, int | str]]) -> str:
    if list(files) == [""]:
        return str(files[""]["sha256"])
    lines = [f"{rel}:{files[rel]['sha256']}" for rel in sorted(files)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, sort_keys=True))
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def digest(path: str) -> str:
    """The digest of a local base file or directory (see the module docstring)."""
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    files = {f.relative_to(p).as_posix(): f for f in p.rglob("*") if f.is_file()}
    lines = [f"{rel}:{file_sha256(files[rel])}" for rel in sorted(files)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


__all__ = ["base_digest", "copy_path", "digest", "file_sha256", "is_local", "local_copy"]
