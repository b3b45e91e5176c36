"""The loop's one plug-in point: a `RunHook` is called at fixed points of an attempt.

Every method of `RunHook` itself does nothing, so a run without a plug-in calls the same
methods at the same points (a null object) and the loop has no branches for one. The tokenizer
extension (`extension/hook.py`) is the plug-in today.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cpt_api.spec import RestoreMode

from .data import Batch


class RunHook:
    # setup
    def tokenizer(self, tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
        """The tokenizer the run trains with, given the base's."""
        return tok

    def carried_by(self, model: PreTrainedModel) -> bool:
        """Whether a checkpoint's weights (or its skeleton's config) already carry what `fit`
        adds; when not, the loop loads them whole before fitting."""
        return True

    def fit(self, model: PreTrainedModel) -> None:
        """Adapt a whole model (loaded in one piece) before sharding. A no-op for weights that
        already carry the change."""

    def grow(self, model: PreTrainedModel) -> list[str]:
        """Adapt a model's shapes before its weights are loaded (a skeleton on the meta device
        is fine); returns the state-dict names of tensors that may now be larger than the
        weights on disk, whose new parts `fill_rows` sets once the rest is loaded."""
        return []

    def fill_rows(self, model: PreTrainedModel) -> None:
        """Set what `grow` added, after the weights are loaded; called on every rank (it may be
        a collective)."""

    def accepts(self, checkpoint_tokenizer_hash: str, mode: RestoreMode) -> bool:
        """Whether a checkpoint of another tokenizer may start this run anyway."""
        return False

    def describe(self, source: str) -> str:
        """The run's tokenizer source, as a tokenizer mismatch names it."""
        return source

    def on_start(self, checkpoint_uri: str) -> None:
        """The model is built: write what belongs beside the run's checkpoints."""

    # data and steps
    def wrap_data(self, data: Any) -> Any:
        """The data pipeline the loop draws from and checkpoints."""
        return data

    def observe(self, batch: Batch, nll: torch.Tensor) -> None:
        """One micro-batch's per-token NLL [B, T-1] (detached)."""

    def end_step(self, metrics: Any) -> None:
        """After every step's gradient all-reduce, on every rank (it may be a collective)."""

    # evaluations and checkpoints
    def evaluate(self, model: torch.nn.Module, evaluator: Any) -> dict[str, float]:
        """Metrics added to each evaluation: on every rank, as a collective (each rank
        measures its share and all return the same values, as `Evaluator.evaluate` does)."""
        return {}

    def checkpoint_metrics(self) -> dict[str, float]:
        """Metrics added to the checkpoint being written."""
        return {}


__all__ = ["RunHook"]
