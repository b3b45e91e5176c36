"""What a checkpoint holds of an attempt: its stateful parts, saved and loaded in one place.

Three layers: `checkpoint.py` is the store's layout (names, manifests, what retention keeps),
`checkpointer.py` moves the bytes (DCP shards, the asynchronous commit, retention), and this
module knows the attempt's parts and maps each onto its files, both ways:

- model and optimizer: DCP shards (any world size loads what any other wrote);
- train state (rank 0's JSON): the step and token counters, the anomaly window, and the LR
  schedule, which is recorded only (the LR is a pure function of the step);
- data positions and RNG, one JSON file per rank; the data pipeline (wrapped by the run's hook
  when it has one, whose state then rides along) re-deals every old rank's position onto the
  new world size; the RNG continues only on the same world size.

Every part speaks the same `Stateful` protocol, so what is written is exactly what is read.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cpt_api.manifest import MODEL_DIR, OPTIMIZER_DIR, TRAIN_STATE, Lineage, data_file, rng_file
from cpt_api.skips import DataSkip
from cpt_api.spec import RestoreMode

from .anomaly import AnomalyDetector
from .checkpointer import Checkpointer, Saved, Snapshot
from .distributed import Dist
from .errors import Refused
from .goodput import TimeAccount
from .hooks import RunHook
from .weight_store import WeightStore
from .weights import Weights, refill
from .rng import RngState, reseed
from .schedule import Schedule


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class DataPositions(Protocol):
    """The data pipeline's part: one state per rank, all of them loaded on every new rank."""

    data_version: str

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dicts(self, states: Sequence[dict[str, Any]]) -> None: ...


@dataclass
class Progress:
    """How far the attempt has trained: optimizer steps and tokens."""

    step: int = 0
    tokens: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])


@dataclass
class TrainState:
    """Rank 0's train-state file: counters, world size, anomaly window, schedule."""

    progress: Progress
    anomaly: AnomalyDetector
    schedule: Schedule
    world_size: int

    def state_dict(self) -> dict[str, Any]:
        return {**self.progress.state_dict(), "worldSize": self.world_size,
                "anomaly": self.anomaly.state_dict(), "schedule": self.schedule.as_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.progress.load_state_dict(state)
        self.anomaly.load_state_dict(state["anomaly"])


@dataclass(frozen=True)
class StartPoint:
    """Where this attempt's weights (and maybe state) come from."""

    uri: str | None
    """Checkpoint URI, or None for the base model."""
    mode: RestoreMode
    weights: Weights
    grown: tuple[str, ...] = ()
    """Tensors the run's hook made larger than these weights (refilled with the base's)."""


@dataclass
class Parts:
    """The attempt's stateful parts, as its checkpoints hold them."""

    model: PreTrainedModel
    optimizer: torch.optim.Optimizer
    train_state: TrainState
    data: DataPositions
    hook: RunHook
    """Adds its metrics to each checkpoint (its state is in the data it wraps)."""
    tokenizer: PreTrainedTokenizerBase
    """Written beside the weights, with the model's config."""


class CheckpointManager:
    def __init__(self, checkpointer: Checkpointer, parts: Parts, *, start: StartPoint, weights: WeightStore,
                 dist: Dist, clock: TimeAccount, lineage: Callable[..., Lineage], config_json: str, seed: int):
        self.checkpointer, self.parts, self.start, self.weights = checkpointer, parts, start, weights
        self.dist, self.clock = dist, clock
        self.lineage = lineage
        """Builds a checkpoint's lineage from its parent and skips (the rest is the attempt's)."""
        self.config_json, self.seed = config_json, seed
        self.saved_step: int | None = None
        self.last_uri: str | None = None

    # --------------------------------------------------------------------------- saving
    def save(self, evals: dict[str, float], train_loss: float | None, *, stable: bool,
             skips: list[DataSkip], evaluation: dict[str, float] | None = None) -> str:
        parts, progress = self.parts, self.parts.train_state.progress
        lineage = self.lineage(parent=self.last_uri or self.start.uri, skips=skips)
        snap = Snapshot(step=progress.step, tokens=progress.tokens,
                        train_state=parts.train_state.state_dict(), data_state=parts.data.state_dict(),
                        lineage=lineage, evals={**evals, **parts.hook.checkpoint_metrics()},
                        train_loss=train_loss, stable=stable, config_json=self.config_json,
                        write_model_files=self._model_files, evaluation=evaluation, rng=RngState())
        self.clock.saving(progress.step)
        with self.clock.timed("checkpointing"):
            uri = self.checkpointer.save(parts.model, parts.optimizer, snap)
        self.saved_step, self.last_uri = progress.step, uri
        return uri

    def _model_files(self, directory: str) -> None:
        self.parts.model.config.save_pretrained(directory)
        self.parts.tokenizer.save_pretrained(directory)

    # -------------------------------------------------------------------------- loading
    def load(self) -> None:
        """Optimizer, counters, anomaly window, data positions and RNG of a fullState start.
        Another world size is fine: shards are re-cut by DCP, data positions re-dealt."""
        uri, source = self.start.uri, self.start.weights.source
        assert source is not None
        directory, parts = source.directory, self.parts
        state = _read_json(directory, TRAIN_STATE)
        saved_world = int(state["worldSize"])
        data_states = [_read_json(directory, data_file(r)) for r in range(saved_world)]
        if data_states[0].get("data_version") != parts.data.data_version:
            raise Refused(f"data version mismatch: checkpoint {uri} was trained on data version "
                          f"{data_states[0].get('data_version')}, the data sources of this run now "
                          f"give {parts.data.data_version}. Use restoreMode weightsOnly to start a "
                          "new data stream from these weights.")
        parts.data.load_state_dicts(data_states)
        self.checkpointer.load_optimizer(parts.model, parts.optimizer, source)
        parts.train_state.load_state_dict(state)
        step = parts.train_state.progress.step
        if saved_world == self.dist.world_size:
            RngState().load_state_dict(_read_json(directory, rng_file(self.dist.rank)))
        else:  # no rank's stream continues: derive a fresh, reproducible one
            reseed(self.seed, step, self.dist.rank)
        self.saved_step, self.last_uri = step, uri

    def load_weights(self, uri: str | None, *, with_state: bool) -> None:
        """Weights (and, `with_state`, the optimizer) of checkpoint `uri`, or the start point's
        weights when None; without state the optimizer starts afresh."""
        model, optimizer = self.parts.model, self.parts.optimizer
        if uri is None:
            refill(model, self.start.weights, self.parts.hook, self.checkpointer, list(self.start.grown))
        else:
            source = self.weights.open(uri, (MODEL_DIR, OPTIMIZER_DIR) if with_state else (MODEL_DIR,))
            self.checkpointer.load_model(model, source)
            if with_state:
                self.checkpointer.load_optimizer(model, optimizer, source)
        if not with_state:
            optimizer.state.clear()
        optimizer.zero_grad(set_to_none=True)

    # ----------------------------------------------------------------- committed saves
    def wait(self) -> None:
        self.checkpointer.wait()

    def completed(self, wait: bool = False) -> list[Saved]:
        """Checkpoints committed in the background since the last call; `wait` for the one in
        flight first (timed as checkpointing: training is blocked)."""
        if wait:
            with self.clock.timed("checkpointing"):
                self.checkpointer.wait()
        return self.checkpointer.completed()

    def close(self) -> None:
        self.checkpointer.close()


def _read_json(directory: str, name: str) -> dict[str, Any]:
    with open(os.path.join(directory, name), encoding="utf-8") as f:
        return json.load(f)  # type: ignore[no-any-return]


__all__ = ["CheckpointManager", "Parts", "Progress", "StartPoint", "Stateful", "TrainState"]
