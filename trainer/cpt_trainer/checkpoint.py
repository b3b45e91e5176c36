"""Checkpoint storage for the format in `cpt_api.manifest`, through fsspec: listing,
verifying, fetching, committing and pruning. What goes into a checkpoint is `checkpointer.py`.

Layout of `<checkpoint_uri>/step-XXXXXXXX/`:
    config.json, generation_config.json                 the model's architecture
    tokenizer.json, tokenizer_config.json, ...          tokenizer
    model/.metadata, model/__<rank>_0.distcp            weights, sharded (torch.distributed.checkpoint)
    optimizer/.metadata, optimizer/__<rank>_0.distcp    AdamW state, sharded and flattened by name
    train-state.json                                    step, tokens, schedule, anomaly window
    rng-rank00000.json, data-rank00000.json, ...        per-rank RNG and data position
    trainer-config.json                                 the resolved config of the attempt
    manifest.json                                       written LAST: sizes + sha256 of all

Commit protocol. Rank 0 clears the directory (a stale manifest first); every rank writes and
seals its own files (fsync in place, or upload from a local staging directory) and hashes them
as it does; rank 0 gathers the hashes and writes the manifest (local: temporary name + fsync +
rename; object stores: one PUT). A crash at any point leaves either no manifest or a manifest
whose checksums match: never a checkpoint that looks valid and is not. Retention runs only
after the new manifest exists and deletes a checkpoint manifest-first, so an interrupted delete
leaves an (ignored, reported) incomplete directory.

Ownership. Under a run's checkpoint root (`run.json`, `pinned.json`: `cpt_api.ownership`)
the trainer writes, prunes and restores only when the root belongs to its run, and retention
keeps every checkpoint the control plane pinned.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
from typing import Any

import fsspec

from cpt_api import store
from cpt_api.manifest import (BLOCKS, MANIFEST, BlockTable, FileBlocks, FileEntry, Lineage,
                                       Manifest, Problem, block_size_for, checkpoint_name, root_of,
                                       verify, writer_rank)
from cpt_api.ownership import RunRecord, import_problem, owner_problem

from .errors import Refused
from .node_cache import locked, node_cache

log = logging.getLogger(__name__)

def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path.rstrip("/")


def join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


# ---------------------------------------------------------------------------------- reading

def read_manifest(uri: str) -> Manifest:
    fs, path = _fs(uri)
    return Manifest.model_validate_json(fs.cat_file(f"{path}/{MANIFEST}"))


def problems_of(uri: str, deep: bool = True) -> tuple[Manifest | None, list[str]]:
    """The manifest of a checkpoint directory and why it is unusable (empty: usable), by the
    store's rules (`cpt_api.store.check`); `deep` re-hashes every file."""
    return store.check(uri, deep)


def list_checkpoints(uri: str, deep: bool = True) -> tuple[list[tuple[str, Manifest]], list[Problem]]:
    """Valid checkpoints directly under `uri` (an attempt's folder), oldest first, as (folder
    name, manifest), and the folders that are not valid, by folder name
    (`cpt_api.store.checkpoints_in`)."""
    refs, problems = store.checkpoints_in(uri, deep)
    return ([(ref.uri.rsplit("/", 1)[-1], ref.manifest) for ref in refs],
            [Problem(p.checkpoint.rsplit("/", 1)[-1], p.reason) for p in problems])


def latest_valid(uri: str, stable_only: bool = False, deep: bool = True) -> tuple[str, Manifest] | None:
    valid, problems = list_checkpoints(uri, deep)
    for problem in problems:
        log.warning("ignoring checkpoint %s: %s", problem.checkpoint, problem.reason)
    candidates = [(n, m) for n, m in valid if m.stable or not stable_only]
    return candidates[-1] if candidates else None


def manifest_digest(uri: str) -> str:
    """The sha256 of a checkpoint's manifest: it names the sha256 of every file, so it stands for
    the whole checkpoint (a checkpoint used as a base is identified by it)."""
    fs, path = _fs(uri)
    return hashlib.sha256(fs.cat_file(f"{path}/{MANIFEST}")).hexdigest()


def read_json(uri: str, name: str) -> Any:
    fs, path = _fs(uri)
    return json.loads(fs.cat_file(f"{path}/{name}"))


# ---------------------------------------------------------------------------------- writing

def is_local(uri: str) -> bool:
    return store.is_local(_fs(uri)[0])


class CheckpointExists(Refused):
    """A committed checkpoint is where a save would go. Only retention deletes checkpoints: an
    attempt's folder is never reused, so this is a folder the save must not touch."""


def prepare(uri: str, step: int) -> str:
    """Make an empty directory for checkpoint `step` (rank 0, before any rank writes): what an
    interrupted save left there goes, a committed checkpoint never (`CheckpointExists`)."""
    fs, root = _fs(uri)
    target = f"{root}/{checkpoint_name(step)}"
    if fs.exists(f"{target}/{MANIFEST}"):
        raise CheckpointExists(f"{target} is a committed checkpoint; a save never replaces one (only retention "
                               "deletes checkpoints)")
    if fs.exists(target):
        fs.rm(target, recursive=True)
    fs.makedirs(target, exist_ok=True)
    return target


def write_json(directory: str, name: str, obj: Any) -> str:
    with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    return name


def own_files(directory: str, rank: int) -> list[str]:
    """Relative paths under a local directory that `rank` wrote (see `writer_rank`)."""
    found = []
    for here, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(here, name), directory).replace(os.sep, "/")
            if rel != MANIFEST and not rel.endswith(".tmp") and writer_rank(rel) == rank:
                found.append(rel)
    return sorted(found)


def seal(directory: str, rel_paths: list[str], target_uri: str | None = None
         ) -> tuple[dict[str, FileEntry], dict[str, FileBlocks]]:
    """Make this rank's files durable and describe them: fsync in place, or upload to
    `target_uri` (an object store) from the local staging directory. Hashing happens here,
    on the local bytes, so nobody downloads a shard again to hash it. Returns each file's entry
    and its blocks' digests (`BlockTable`), from one read."""
    entries, blocks = {}, {}
    fs, target = _fs(target_uri) if target_uri else (None, "")
    for rel in rel_paths:
        local = os.path.join(directory, rel)
        with open(local, "rb") as f:
            os.fsync(f.fileno())
        entries[rel], blocks[rel] = hash_blocks(local, block_size_for(os.path.getsize(local)))
        if fs is not None:
            fs.put_file(local, f"{target}/{rel}")
    return entries, blocks


def hash_blocks(path: str, block_size: int) -> tuple[FileEntry, FileBlocks]:
    """The file's size and sha256, and the sha256 of each `block_size` block of it (the
    verification granularity of a streamed restore: a rank reads and hashes whole blocks)."""
    whole, blocks, size = hashlib.sha256(), [], 0
    with open(path, "rb") as f:
        while block := f.read(block_size):
            whole.update(block)
            blocks.append(hashlib.sha256(block).hexdigest())
            size += len(block)
    return FileEntry(size=size, sha256=whole.hexdigest()), FileBlocks(block_size=block_size, sha256=blocks)


def write_blocks(target_uri: str, blocks: dict[str, FileBlocks]) -> FileEntry:
    """Write the checkpoint's `BlockTable` (rank 0, before the manifest that lists it)."""
    data = BlockTable(files=blocks).model_dump_json(by_alias=True).encode()
    store.put_atomic(target_uri, BLOCKS, data)
    return FileEntry(size=len(data), sha256=hashlib.sha256(data).hexdigest())


_LOCAL = fsspec.filesystem("file")


def commit(uri: str, step: int, tokens: int, files: dict[str, FileEntry], lineage: Lineage,
           evals: dict[str, float], train_loss: float | None, stable: bool) -> None:
    """Write the manifest of checkpoint `step`: the commit point (rank 0, after every rank's
    files are durable). Local: temporary name + fsync + rename; object stores: one PUT."""
    manifest = Manifest(step=step, tokens=tokens, lineage=lineage, files=files, evals=evals,
                        train_loss=train_loss, stable=stable,
                        created_at=dt.datetime.now(dt.timezone.utc).isoformat())
    store.put_atomic(f"{uri.rstrip('/')}/{checkpoint_name(step)}", MANIFEST,
                     manifest.model_dump_json(by_alias=True, indent=1).encode())


# ---------------------------------------------------------------------------------- restoring

def local_path(uri: str) -> str:
    """Where `fetch` puts a verified copy of `uri` on this node (the path itself when local)."""
    fs, path = _fs(uri)
    return path if store.is_local(fs) else _cache_dir(uri)


def fetch(uri: str, parts: tuple[str, ...] | None = None) -> list[str]:
    """Make `local_path(uri)` a verified copy of checkpoint `uri` (or of its top-level files
    plus the sub-directories in `parts`); returns why it is unusable (empty: usable).

    One process per node calls this (local rank 0) while the others wait: a remote checkpoint is
    downloaded once per node into a cache, under a file lock, and every byte that is loaded is
    a byte that was hashed. A local checkpoint is verified in place."""
    manifest, problems = problems_of(uri, deep=False)
    if manifest is None or problems:
        return problems
    wanted = {rel: e for rel, e in manifest.files.items()
              if parts is None or "/" not in rel or rel.split("/", 1)[0] in parts}
    fs, path = _fs(uri)
    if store.is_local(fs):
        return _verify(fs, path, wanted)
    local = _cache_dir(uri)
    with locked(local + ".lock"):
        done = local + ".verified.json"
        have = _verified(done)
        # A cached file counts only with the digest the manifest now gives: a checkpoint
        # written again under the same URI (`prepare` replaces one) must not load old bytes.
        missing = {rel: e for rel, e in wanted.items() if have.get(rel) != e.sha256}
        for rel in missing:
            os.makedirs(os.path.dirname(os.path.join(local, rel)), exist_ok=True)
            fs.get_file(f"{path}/{rel}", os.path.join(local, rel))
        problems = _verify(_LOCAL, local, missing)
        if not problems:
            with open(done, "w") as f:
                json.dump(have | {rel: e.sha256 for rel, e in missing.items()}, f, sort_keys=True)
    return problems


def _verified(path: str) -> dict[str, str]:
    """Relative path -> sha256 of the cached files that were hashed and matched."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        done = json.load(f)
    return done if isinstance(done, dict) else {}  # a list: names only, from before digests


def _verify(fs: fsspec.AbstractFileSystem, root: str, files: dict[str, FileEntry]) -> list[str]:
    observed = {rel: store.file_digest(fs, f"{root}/{rel}") for rel in files if fs.exists(f"{root}/{rel}")}
    return verify(files, observed)


def _cache_dir(uri: str) -> str:
    return str(node_cache("checkpoints", hashlib.sha256(uri.encode()).hexdigest()[:16]))


# -------------------------------------------------------------------------------- retention

def ownership_problem(root: str | None, run: RunRecord | None, restore_from: str | None,
                      base: str | None = None, imported: bool = False) -> str | None:
    """Why `run` may not use its checkpoint root, restore `restore_from` or start from checkpoint
    `base` (None: it may). The root is claimed if nobody has yet (the control plane normally has,
    before the first attempt); another run's root is only read, and another run's checkpoint is a
    base only when the spec imports it (`imported`)."""
    if root is None or run is None:
        return None
    problem = owner_problem(root, store.claim(root, run), run)
    source = root_of(restore_from) if restore_from else None
    if problem is None and source is not None and source.rstrip("/") != root.rstrip("/"):
        found = store.owner(source)
        problem = owner_problem(source, found, run) if found is not None else None
    base_root = root_of(base) if base else None
    if problem is None and base and base_root is not None and base_root.rstrip("/") != root.rstrip("/"):
        found = store.owner(base_root)
        problem = import_problem(base, found, run, imported) if found is not None else None
    return problem


def pinned(root: str | None, uri: str, valid: list[tuple[str, Manifest]]) -> set[str]:
    """Of `valid` (the checkpoints under the attempt folder `uri`), the names retention must
    keep: those the control plane pinned at `root`, and those it has not judged yet (any of them
    may turn out to be the last good one). Nothing when no control plane manages `root`."""
    if root is None or not uri.startswith(root.rstrip("/") + "/"):
        return set()
    folder = uri[len(root.rstrip("/")) + 1:].strip("/")
    pins = store.pins(root)
    judged = pins.judged_through(folder)
    return pins.steps_in(folder) | {name for name, m in valid if m.step > judged}


def prune(uri: str, keep: int, protect: set[str] | frozenset[str] = frozenset(),
          valid: list[tuple[str, Manifest]] | None = None) -> list[str]:
    """Delete valid checkpoints beyond the newest `keep`, except the protected ones (the pinned,
    the one just written). Incomplete directories are left for a person to look at (they are
    reported by listing). `valid`: the folder's listing, when the caller has just taken it."""
    fs, root = _fs(uri)
    if valid is None:
        valid, _ = list_checkpoints(uri, deep=False)
    spare = set(protect)
    doomed = [name for name, _ in valid[:-keep] if name not in spare] if keep > 0 else []
    for name in doomed:
        fs.rm_file(f"{root}/{name}/{MANIFEST}")
        fs.rm(f"{root}/{name}", recursive=True)
    return doomed
