"""The tokenizer extension as the loop's `RunHook`: the extended tokenizer, its rows on every
model the run builds, lineage across the extension, new-token data, the new-terms evaluation."""
from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cpt_api.spec import RestoreMode
from cpt_api.trainer_config import TrainerConfig

from ..data import Batch
from ..hooks import RunHook
from .data import NewTokenData
from .evaluation import NewTermsEvaluation
from .tokenizer import Extension, build


class ExtensionHook(RunHook):
    def __init__(self, ext: Extension, cfg: TrainerConfig, *, rank: int, is_main: bool):
        self.ext, self.cfg, self.rank, self.is_main = ext, cfg, rank, is_main
        self.data: NewTokenData | None = None
        self.new_terms = NewTermsEvaluation(ext.tokenizer, ext.ids)

    def tokenizer(self, tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
        return self.ext.tokenizer

    def carried_by(self, model: PreTrainedModel) -> bool:
        return self.ext.carried_by(model)

    def fit(self, model: PreTrainedModel) -> None:
        self.ext.fit(model)

    def grow(self, model: PreTrainedModel) -> list[str]:
        return self.ext.grow(model)

    def fill_rows(self, model: PreTrainedModel) -> None:
        self.ext.fill_rows(model)

    def accepts(self, checkpoint_tokenizer_hash: str, mode: RestoreMode) -> bool:
        return self.ext.accepts(checkpoint_tokenizer_hash, mode)

    def describe(self, source: str) -> str:
        return self.ext.describe(source)

    def on_start(self, checkpoint_uri: str) -> None:
        if self.is_main:  # one writer; the content is fixed by the hash
            self.ext.save(checkpoint_uri)

    def wrap_data(self, data: Any) -> NewTokenData:
        spec = self.ext.spec
        # Oversampling counts micro-batches: a step draws grad_accumulation of them.
        batches = spec.oversample_steps * self.cfg.spec.training.grad_accumulation
        self.data = NewTokenData(data, self.ext, factor=spec.oversample_factor, batches=batches,
                                 seed=self.cfg.spec.data.seed, rank=self.rank)
        return self.data

    def observe(self, batch: Batch, nll: torch.Tensor) -> None:
        assert self.data is not None
        self.data.observe(batch, nll)

    def end_step(self, metrics: Any) -> None:
        assert self.data is not None
        self.data.end_step(metrics)

    def evaluate(self, model: torch.nn.Module, evaluator: Any) -> dict[str, float]:
        return self.new_terms(model, evaluator)

    def checkpoint_metrics(self) -> dict[str, float]:
        assert self.data is not None
        return self.data.checkpoint_metrics()


def build_hook(cfg: TrainerConfig, tokenizer: PreTrainedTokenizerBase, *, rank: int,
               is_main: bool) -> RunHook:
    """The run's hook: the extension's with `tokenizer.extend`, else the no-op `RunHook`."""
    ext = build(cfg, tokenizer, is_main=is_main)
    return RunHook() if ext is None else ExtensionHook(ext, cfg, rank=rank, is_main=is_main)


__all__ = ["ExtensionHook", "build_hook"]
