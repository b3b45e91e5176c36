"""Where a process's weights come from: the immutable base and the run's checkpoints, verified
on this node before any rank reads them. The trainer and the separate evaluator share it.

Collective: every rank calls every method in the same order; one process per node downloads
and hashes, the others wait and read the same verified bytes.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from cpt_api.manifest import MODEL_DIR
from cpt_api.spec import BaseModelSpec, ModelFormat

from . import checkpoint, distributed
from .distributed import Dist
from .errors import Refused
from .hooks import RunHook
from .load.node_copy import base_digest, local_copy
from .load.verified import CheckpointSource, open_blocks
from .weights import Weights, build, fill

if TYPE_CHECKING:
    from .checkpointer import Checkpointer
    from .parallel import Parallel


class WeightStore:
    def __init__(self, base: BaseModelSpec, dist: Dist):
        self.base, self.dist = base, dist
        self._base_path: str | None = None

    def fetch(self, uri: str, parts: tuple[str, ...] | None) -> str:
        """A verified local copy of checkpoint `uri` (its top-level files and `parts`)."""
        problems = checkpoint.fetch(uri, parts) if self.dist.local_rank == 0 else []
        problems = distributed.gather_problems(problems)
        if problems:
            raise Refused(f"cannot restore from {uri}: {'; '.join(problems)}")
        return checkpoint.local_path(uri)

    def open(self, uri: str, parts: tuple[str, ...]) -> CheckpointSource:
        """Checkpoint `uri` to load: its small top-level files verified on this node, its DCP
        `parts` read by each rank from the store, verified block by block (or, for a checkpoint
        without a block table, from a verified copy of the parts on this node)."""
        directory = self.fetch(uri, ())
        manifest = checkpoint.read_manifest(uri)
        blocks = open_blocks(uri, manifest, copy=directory)
        if blocks is None:
            directory = self.fetch(uri, parts)
        return CheckpointSource(uri, directory, blocks, manifest)

    def base_path(self) -> str:
        """A local path of the base: itself, this node's verified copy of a remote one (every
        rank asks; one downloads), or a checkpoint base's verified top-level files."""
        if self._base_path is None:
            base = self.base
            path = self.fetch(base.uri, ()) if base.format == ModelFormat.checkpoint else local_copy(base.uri)
            if not os.path.exists(path):
                raise Refused(f"baseModel.uri {base.uri} does not exist")
            self._base_path = path
        return self._base_path

    def base_digest(self) -> str:
        """The base's sha256, computed by rank 0 (hashing a large base takes a while) and told
        to the others."""
        base = self.base
        if not self.dist.is_main:
            return str(distributed.broadcast_object(None))
        # a checkpoint base's manifest pins every file's sha256
        digest = checkpoint.manifest_digest(base.uri) if base.format == ModelFormat.checkpoint \
            else base_digest(base.uri)
        return str(distributed.broadcast_object(digest))

    def base_weights(self) -> Weights:
        """The immutable base (the start of a first attempt, the KL reference)."""
        if self.base.format == ModelFormat.checkpoint:
            return Weights.of_checkpoint(self.open(self.base.uri, (MODEL_DIR,)))
        return Weights.of_base(self.base, self.base_path())

    def reference(self, hook: RunHook, like: Parallel, checkpointer: Checkpointer, *,
                  dtype: torch.dtype, attention: str) -> torch.nn.Module:
        """The frozen base for KL terms and drift suites: always the immutable base, never a
        restore point; sharded like `like` (each rank reads only its slices)."""
        from .parallel import shard_frozen

        weights = self.base_weights()
        loading = build(weights, hook, dtype=dtype, attention=attention)
        ref = shard_frozen(loading.model, like, self.dist, dtype)
        fill(loading, weights, hook, checkpointer)
        return ref


__all__ = ["WeightStore"]
