"""A model's starting weights, loaded so that no rank ever holds the whole model.

Two steps around sharding. `build` gives the architecture on the meta device (no memory, no
random init) with the shapes the run needs (the tokenizer extension's rows, `RunHook.grow`);
`parallelize` shards it and each rank allocates only its own slices; `fill` then has each rank
read exactly those slices: ranges of the base's safetensors files (`fill.py`), or its shards of
one of our DCP checkpoints through DCP (streamed and verified, `verified.py`), and sets the rows
the extension added (a collective). A rank's host memory while loading is its shard plus one
read buffer.

GGUF bases are the exception: transformers dequantises a GGUF file whole, so every rank holds the
whole model in fp32 while loading it (a small-model format: SmolLM2-135M is 0.5 GiB). The memory
planner counts that peak; convert a large GGUF base to safetensors to load it sharded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from transformers import PreTrainedModel

from cpt_api.manifest import MODEL_DIR
from cpt_api.spec import BaseModelSpec

from .hooks import RunHook
from .model import load_model, materialize, model_source, skeleton
from .load.fill import fill as read_slices
from .load.safetensors import Index
from .load.verified import CheckpointSource

if TYPE_CHECKING:
    from .checkpointer import Checkpointer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Weights:
    """Where weights come from: a local HF directory or GGUF file (the base, or this node's
    copy of it), or a checkpoint read through `source`."""

    directory: str
    """Holds config.json (and the tokenizer); for GGUF the file's directory."""
    gguf_file: str | None = None
    source: CheckpointSource | None = None

    @classmethod
    def of_base(cls, base: BaseModelSpec, path: str) -> Weights:
        directory, gguf = model_source(base, path)
        return cls(directory, gguf_file=gguf)

    @classmethod
    def of_checkpoint(cls, source: CheckpointSource) -> Weights:
        return cls(source.directory, source=source)

    def describe(self) -> str:
        return self.source.uri if self.source is not None else self.gguf_file or self.directory


@dataclass
class Loading:
    """A model on its way from `build` to `fill`."""

    model: PreTrainedModel
    whole: bool
    """Loaded in one piece already (GGUF, or a checkpoint the hook must fit): `fill` has nothing
    left to do."""
    grown: list[str] = field(default_factory=list)
    """Tensors larger than the weights on disk (their new rows are the hook's to set)."""


def build(weights: Weights, hook: RunHook, *, dtype: torch.dtype = torch.float32,
          attention: str = "sdpa") -> Loading:
    """The model to shard: a skeleton, or (GGUF; a checkpoint from before the run's tokenizer
    extension) the whole model, fitted by the hook."""
    if weights.gguf_file is not None:
        model = load_model(weights.directory, dtype=dtype, attention=attention,
                           gguf_file=weights.gguf_file)
        hook.fit(model)
        return Loading(model, whole=True)
    model = skeleton(weights.directory, attention=attention, dtype=dtype)
    if weights.source is not None and not hook.carried_by(model):
        _load_checkpoint_whole(model, weights.source)
        hook.fit(model)
        return Loading(model, whole=True)
    return Loading(model, whole=False, grown=hook.grow(model))


def fill(loading: Loading, weights: Weights, hook: RunHook, checkpointer: Checkpointer) -> None:
    """Each rank reads the slices it holds of `loading.model` (sharded and materialised by now),
    then the hook sets the rows it grew. Every rank calls this: it may be a collective."""
    if loading.whole:
        return
    refill(loading.model, weights, hook, checkpointer, loading.grown)


def refill(model: PreTrainedModel, weights: Weights, hook: RunHook, checkpointer: Checkpointer,
           grown: list[str]) -> None:
    """Load `weights` again into a model that was built from them (anomaly recovery to the
    base): its shapes and sharding stay, its values are replaced."""
    if weights.source is not None:
        checkpointer.load_model(model, weights.source)
    elif weights.gguf_file is not None:
        fresh = load_model(weights.directory, gguf_file=weights.gguf_file)
        hook.fit(fresh)
        set_model_state_dict(model, fresh.state_dict(), options=StateDictOptions(full_state_dict=True))
        return
    else:
        index = Index(weights.directory)
        read_slices(model, index, grown)
        log.info("read %.1f MiB of %s", index.bytes_read / 2**20, weights.describe())
    if grown:
        hook.fill_rows(model)


def _load_checkpoint_whole(model: PreTrainedModel, source: CheckpointSource) -> None:
    import torch.distributed.checkpoint as dcp

    log.info("loading %s whole: its weights predate the run's tokenizer extension", source.uri)
    materialize(model, "cpu")
    # torch.distributed.checkpoint re-exports load without __all__ (no explicit export)
    dcp.load(model.state_dict(), storage_reader=source.reader(MODEL_DIR), no_dist=True)  # type: ignore[attr-defined]


__all__ = ["Loading", "Weights", "build", "fill", "refill"]
