"""The one owner of checkpoint save, load and retention over a run's stateful parts.

Parts: the model and the AdamW state (sharded through torch.distributed.checkpoint, so any
world size can load what any other wrote), and small JSON files: the train state (rank 0) and,
per rank, the data position and RNG. The loop hands over a `Snapshot` of the JSON parts and the
live model / optimizer (`checkpoint_manager.py` assembles both from the attempt's stateful parts, and
loads them back); this module decides where bytes go and when a checkpoint exists.

Asynchronous saves. `save` copies the tensors to host memory (the only part that stalls
training), writes the small files, and returns; one background thread then writes the shards,
seals them (fsync or upload, hashing on the way), gathers every rank's hashes to rank 0, which
writes the manifest (the commit point) and applies retention. The background thread talks over
its own gloo process group, so its collectives never interleave with the training step's. At
most one save is in flight: the next `save` (or `close`) waits for the previous one.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import SavePlan, WriteItem
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.storage import StorageReader
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)

from cpt_api.manifest import (BLOCKS, CONFIG, MODEL_DIR, OPTIMIZER_DIR, TRAIN_STATE,
                                       FileBlocks, FileEntry, Lineage, Manifest, checkpoint_name, data_file,
                                       rng_file)
from cpt_api.storage import STAGING_DIR_ENV

from . import checkpoint, distributed
from .checkpoint import CheckpointExists
from .distributed import Dist
from .errors import Refused
from .load.verified import CheckpointSource
from .rng import RngState
from .store_errors import TRANSIENT

log = logging.getLogger(__name__)

# Optimizer state keyed by parameter name (not by position), so that another sharding, another
# world size or another wrapping loads it.
_OPTIM = StateDictOptions(flatten_optimizer_state_dict=True)
RETENTION_TRIES = 3
RETENTION_WAIT_S = 1.0
"""Retention after a commit is tried again after 1 s and 2 s before the save reports it."""


@dataclass
class Snapshot:
    """What a checkpoint records besides tensors (all JSON-serialisable)."""

    step: int
    tokens: int
    train_state: dict[str, Any]
    data_state: dict[str, Any]
    lineage: Lineage
    evals: dict[str, float]
    train_loss: float | None
    stable: bool
    config_json: str
    write_model_files: Callable[[str], None]
    """Writes config.json and the tokenizer into a directory (rank 0)."""
    evaluation: dict[str, float] | None = None
    """This step's evaluation, which the loop announces once the checkpoint is committed."""
    rng: RngState = dataclasses.field(default_factory=RngState)
    """This rank's random streams, read when the small files are written."""


@dataclass
class Saved:
    """A committed checkpoint, reported back to the loop on the main thread."""

    step: int
    tokens: int
    uri: str
    seconds: float
    """From the start of the save to the manifest (the training stall is `stall_seconds`)."""
    stall_seconds: float
    """Training time the save blocked: the host copy when asynchronous, all of it otherwise."""
    evals: dict[str, float] | None = None
    """The evaluation to announce with this checkpoint, if the loop asked for it."""
    retention_error: str | None = None
    """Why retention could not delete the checkpoints beyond `keep` after this one was committed
    (tried RETENTION_TRIES times): the checkpoint is saved all the same, and the next save tries
    again."""


class SmallFirst(DefaultSavePlanner):
    """DCP's save planner, laying each rank's file out for streamed restores: what every rank
    reads back (the replicated items: AdamW's step counts, hyperparameters) is written once, by
    rank 0 (`dedup_save_to_lowest_rank`), and every file starts with its small items. A rank
    restoring then reads its own shards and the first block or two of rank 0's files, instead
    of one verified block per parameter from every file (`load/verified.py`)."""

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        plan = super().finish_plan(new_plan)
        return dataclasses.replace(plan, items=sorted(plan.items, key=_item_bytes))


def _item_bytes(item: WriteItem) -> int:
    if item.tensor_data is None:  # bytes (pickled values): written first anyway
        return 0
    return math.prod(item.tensor_data.size) * item.tensor_data.properties.dtype.itemsize


class HostStager:
    """Copies a state dict's tensors to host memory (pinned on CUDA) for the background write,
    reusing the host buffers from one save to the next.

    Some torch releases (seen on 2.11 and 2.13 builds) close DCP's stager after every stage,
    which empties its copy table: the second save then fails with `KeyError: <class 'type'>` on
    any state dict holding more than tensors. Where that happened, the next save gets a fresh
    stager (new host buffers, so a longer stall on those releases, but a working save)."""

    def __init__(self, *, pinned: bool):
        self.pinned = pinned
        self.stager = self._new()
        self.renewed = 0

    def _new(self) -> DefaultStager:
        return DefaultStager(StagingOptions(use_pinned_memory=self.pinned, use_shared_memory=False,
                                            use_async_staging=False, use_non_blocking_copy=False))

    def stage(self, state: dict[str, Any]) -> dict[str, Any]:
        # staging is synchronous (use_async_staging=False): stage returns the dict, never a Future
        staged = cast(dict[str, Any], self.stager.stage(state))
        inner = getattr(self.stager, "_state_dict_stager", None)
        if inner is not None and not getattr(inner, "_deepcopy_dispatch", True):
            self.stager = self._new()
            self.renewed += 1
        return staged

    def close(self) -> None:
        self.stager.close()


class Checkpointer:
    def __init__(self, uri: str, dist_info: Dist, *, keep: int, async_save: bool = True,
                 root: str | None = None, restore_from: str | None = None):
        self.uri, self.dist, self.keep, self.async_save = uri, dist_info, keep, async_save
        self.root = root
        """The run's checkpoint root, whose pins retention keeps (None: no control plane)."""
        self.restore_from = restore_from
        # Background collectives get their own group: the training step's collectives on the
        # default group would otherwise interleave with them in another order on each rank.
        # every rank is a member (no ranks given), so new_group never returns NON_GROUP_MEMBER
        self._group = cast("dist.ProcessGroup", dist.new_group(backend="gloo", timeout=dist_info.timeout)) \
            if dist_info.enabled else None
        self._stager = HostStager(pinned=dist_info.device.type == "cuda")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future[Saved] | None = None
        self._done: list[Saved] = []

    # ------------------------------------------------------------------------------ saving
    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, snap: Snapshot) -> str:
        """Start checkpoint `snap.step` (collective). Returns its URI; it exists once committed
        (see `completed`)."""
        self.wait()
        began = time.monotonic()
        target_uri = checkpoint.join(self.uri, checkpoint_name(snap.step))
        refused = ""
        if self.dist.is_main:
            try:
                checkpoint.prepare(self.uri, snap.step)
            except CheckpointExists as exc:
                refused = str(exc)
        # every rank learns of a refusal (a barrier would leave the others waiting for rank 0)
        refused = str(distributed.broadcast_object(refused))
        if refused:
            raise CheckpointExists(refused)
        staging = target_uri if checkpoint.is_local(self.uri) else \
            tempfile.mkdtemp(prefix="cpt-ckpt-", dir=os.environ.get(STAGING_DIR_ENV) or None)
        self._write_small(staging, snap)
        staged = self._stager.stage({
            MODEL_DIR: get_model_state_dict(model),
            OPTIMIZER_DIR: get_optimizer_state_dict(model, optimizer, options=_OPTIM)})
        stall = time.monotonic() - began
        self._pending = self._pool.submit(self._finish, staging, target_uri, staged, snap, began, stall)
        if not self.async_save:
            self.wait()
        return target_uri

    def _write_small(self, directory: str, snap: Snapshot) -> None:
        rank = self.dist.rank
        os.makedirs(directory, exist_ok=True)
        if rank == 0:
            snap.write_model_files(directory)
            checkpoint.write_json(directory, TRAIN_STATE, snap.train_state)
            with open(os.path.join(directory, CONFIG), "w", encoding="utf-8") as f:
                f.write(snap.config_json)
        checkpoint.write_json(directory, data_file(rank), snap.data_state)
        checkpoint.write_json(directory, rng_file(rank), snap.rng.state_dict())

    def _finish(self, staging: str, target_uri: str, staged: dict[str, Any], snap: Snapshot,
                began: float, stall: float) -> Saved:
        remote = None if staging == target_uri else target_uri
        retention_error = None
        try:
            for part in (MODEL_DIR, OPTIMIZER_DIR):
                # torch.distributed.checkpoint re-exports save and FileSystemWriter without __all__
                dcp.save(staged[part],  # type: ignore[attr-defined]
                         storage_writer=dcp.FileSystemWriter(os.path.join(staging, part)),  # type: ignore[attr-defined]
                         planner=SmallFirst(dedup_save_to_lowest_rank=True), process_group=self._group)
            mine = checkpoint.seal(staging, checkpoint.own_files(staging, self.dist.rank), remote)
            files, blocks = self._gather(mine)
            if self.dist.is_main:
                files[BLOCKS] = checkpoint.write_blocks(target_uri, blocks)
                checkpoint.commit(self.uri, snap.step, snap.tokens, files, snap.lineage, snap.evals,
                                  snap.train_loss, snap.stable)
                retention_error = self._retain(snap.step)
        finally:
            if remote is not None:  # a failed upload leaves no copy behind on the node's disk
                _remove_tree(staging)
        seconds = time.monotonic() - began
        return Saved(snap.step, snap.tokens, target_uri, seconds,
                     stall if self.async_save else seconds,
                     snap.evaluation, retention_error)

    def _retain(self, step: int) -> str | None:
        """Delete what `keep` no longer keeps, after the commit: an error here does not undo a
        saved checkpoint. Retried with short waits (a store's brief refusal); what still fails
        is returned for the loop to report, and the next save tries again."""
        for attempt in range(RETENTION_TRIES):
            try:
                valid, _ = checkpoint.list_checkpoints(self.uri, deep=False)  # sizes only: one listing
                checkpoint.prune(self.uri, self.keep, self._protected(step, valid), valid)
                return None
            except TRANSIENT as exc:  # botocore's are no OSErrors: a pins file read mid-replace
                error = f"retention after {checkpoint_name(step)} failed: {type(exc).__name__}: {exc}"
                log.warning("%s (try %d of %d)", error, attempt + 1, RETENTION_TRIES)
                if attempt + 1 < RETENTION_TRIES:
                    time.sleep(RETENTION_WAIT_S * 2 ** attempt)
        return error

    def _protected(self, step: int, valid: list[tuple[str, Manifest]]) -> set[str]:
        """Of the folder's `valid` checkpoints, never pruned: the one just written, the one this
        attempt started from (should it sit in this folder), the newest stable one (anomaly
        recovery restores it) and what the control plane pinned or has not judged yet."""
        names = {checkpoint_name(step)} | checkpoint.pinned(self.root, self.uri, valid)
        stable = [name for name, m in valid if m.stable]
        if stable:
            names.add(stable[-1])
        if self.restore_from and self.restore_from.rstrip("/").rsplit("/", 1)[0] == self.uri.rstrip("/"):
            names.add(self.restore_from.rstrip("/").rsplit("/", 1)[1])
        return names

    def _gather(self, mine: tuple[dict[str, FileEntry], dict[str, FileBlocks]]
                ) -> tuple[dict[str, FileEntry], dict[str, FileBlocks]]:
        """Every rank's file entries and block digests, merged on rank 0."""
        if self._group is None:
            return mine
        parts: list[Any] = [None] * self.dist.world_size if self.dist.is_main else []
        dist.gather_object(mine, parts if self.dist.is_main else None, dst=0, group=self._group)
        files: dict[str, FileEntry] = {}
        blocks: dict[str, FileBlocks] = {}
        for part in parts:
            files.update(part[0] if part else {})
            blocks.update(part[1] if part else {})
        return files, blocks

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; re-raises its failure."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._done.append(pending.result())

    def completed(self) -> list[Saved]:
        """Saves committed since the last call (non-blocking)."""
        if self._pending is not None and self._pending.done():
            self.wait()
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
            self._stager.close()

    # ----------------------------------------------------------------------------- loading
    def load_model(self, model: torch.nn.Module, source: CheckpointSource) -> None:
        """A checkpoint's weights into `model`, whatever its sharding: each rank reads only the
        slices it holds (straight from the store, verified block by block, when the checkpoint
        has a block table)."""
        state = get_model_state_dict(model)
        self._load(state, source.reader(MODEL_DIR))
        set_model_state_dict(model, state)

    def load_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       source: CheckpointSource) -> None:
        state = get_optimizer_state_dict(model, optimizer, options=_OPTIM)
        self._load(state, source.reader(OPTIMIZER_DIR))
        set_optimizer_state_dict(model, optimizer, state, options=_OPTIM)

    def _load(self, state: dict[str, Any], reader: StorageReader) -> None:
        """DCP's collective load; a rank's refusal (a block that fails its digest) reaches every
        rank through DCP's gathered failures and ends the attempt as refused on all of them."""
        try:
            # torch.distributed.checkpoint re-exports load without __all__ (no explicit export)
            dcp.load(state, storage_reader=reader, process_group=self._group)  # type: ignore[attr-defined]
        except CheckpointException as exc:
            refused = [failure for failure, _ in exc.failures.values() if isinstance(failure, Refused)]
            if refused:
                raise Refused(str(refused[0])) from None
            raise


def _remove_tree(directory: str) -> None:
    for here, dirs, names in os.walk(directory, topdown=False):
        for name in names:
            os.unlink(os.path.join(here, name))
        for name in dirs:
            os.rmdir(os.path.join(here, name))
    os.rmdir(directory)
