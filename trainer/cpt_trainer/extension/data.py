"""New-token data: oversampling windows that hold a new token, and counting what they teach.

A mean-initialised row starts where its pieces were, and a rare term is seen too seldom to move
it (shared/MISSION.md §6, failure story 2). `NewTokenData` wraps the data pipeline for that:
- Oversampling, by rejection: during the first `oversampleSteps` steps a drawn window with no
  new token is kept with probability 1/`oversampleFactor`, one with a new token always, so the
  latter are drawn `factor` times as often relative to the rest. Rejected windows are skipped
  data (the stream moves on). The coin is a function of (seed, rank, draw number) and the draw
  counters live in the data state, so a fullState resume continues exactly.
- Per-new-token loss and count seen (as a target), summed over ranks every step, exported to
  Prometheus and written into each checkpoint's metrics (`new_token.<term>.loss|seen` for the
  first `REPORTED` tokens plus `new_tokens.loss|seen|unseen` over all). The counters ride in the
  data state: fullState continues them, weightsOnly starts them anew with its data stream.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import distributed
from ..data import Batch

if TYPE_CHECKING:
    from .tokenizer import Extension

REPORTED = 64
"""New tokens with their own keys in checkpoint metrics; the status of a run must stay small."""


class NewTokenData:
    """The data pipeline with oversampling of new-token windows and the new-token counters
    (see the module docstring); everything else is the pipeline's."""

    def __init__(self, pipeline: Any, ext: Extension, *, factor: float, batches: int, seed: int,
                 rank: int):
        self.pipeline, self.ext = pipeline, ext
        self.factor, self.batches, self.seed, self.rank = factor, batches, seed, rank
        self.drawn = 0
        """Micro-batches handed out (oversampling applies to the first `batches`)."""
        self.draws = 0
        """Windows drawn while oversampling (the coin's index)."""
        n = len(ext.tokens)
        self.seen = np.zeros(n, dtype=np.int64)
        self.window = np.zeros((2, n), dtype=np.float64)
        """Loss sum and count per new token since the last checkpoint."""
        self._local: torch.Tensor | None = None
        self._lookup: torch.Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipeline, name)

    def next_batch(self, batch_size: int) -> Batch:
        if self.drawn >= self.batches or self.factor <= 1.0:
            self.drawn += 1
            plain: Batch = self.pipeline.next_batch(batch_size)
            return plain
        kept: list[Batch] = []
        while len(kept) < batch_size:
            window = self.pipeline.next_batch(1)
            coin = np.random.default_rng([self.seed, self.rank, self.draws]).random()
            self.draws += 1
            if coin * self.factor < 1.0 or bool(torch.isin(window.input_ids, self.ext.ids).any()):
                kept.append(window)
        self.drawn += 1
        return _concat(kept)

    # counters
    def observe(self, batch: Batch, nll: torch.Tensor) -> None:
        """Add one micro-batch's per-token NLL [B, T-1] at new-token targets."""
        labels = batch.labels.to(nll.device)[:, 1:]
        if self._lookup is None or self._lookup.device != nll.device:
            size = int(self.ext.ids.max()) + 1 if len(self.ext.ids) else 1
            self._lookup = torch.full((size,), -1, dtype=torch.long, device=nll.device)
            self._lookup[self.ext.ids.to(nll.device)] = torch.arange(len(self.ext.ids),
                                                                     device=nll.device)
            self._local = torch.zeros(2, len(self.ext.ids), dtype=torch.float64, device=nll.device)
        assert self._local is not None
        sel = (labels >= 0) & (labels < self._lookup.numel())
        index = torch.full_like(labels, -1)
        index[sel] = self._lookup[labels[sel]]
        hit = index >= 0
        self._local[0].index_add_(0, index[hit], nll[hit].double())
        self._local[1].index_add_(0, index[hit], torch.ones_like(nll[hit], dtype=torch.float64))

    def end_step(self, metrics: Any) -> None:
        """Sum this step's counters over ranks (collective) and export them."""
        if self._local is None:
            self._local = torch.zeros(2, len(self.ext.ids), dtype=torch.float64)
        distributed.all_reduce_sum(self._local)
        step = self._local.cpu().numpy().copy()  # .cpu() of a CPU tensor shares its memory
        self._local.zero_()
        self.window += step
        self.seen += step[1].astype(np.int64)
        for i, t in enumerate(self.ext.tokens):
            count = int(step[1, i])
            if count:
                metrics.new_token(t.term, loss=self.window[0, i] / self.window[1, i], seen=count)

    def checkpoint_metrics(self) -> dict[str, float]:
        """Metrics for the checkpoint being written; starts the next interval."""
        out: dict[str, float] = {}
        sums, counts = self.window
        for i, t in enumerate(self.ext.tokens[:REPORTED]):
            out[f"new_token.{t.term}.seen"] = float(self.seen[i])
            if counts[i]:
                out[f"new_token.{t.term}.loss"] = float(sums[i] / counts[i])
        out["new_tokens.seen"] = float(self.seen.sum())
        out["new_tokens.unseen"] = float((self.seen == 0).sum())
        if counts.sum():
            out["new_tokens.loss"] = float(sums.sum() / counts.sum())
        self.window[:] = 0
        return out

    # state
    def state_dict(self) -> dict[str, Any]:
        return {**self.pipeline.state_dict(),
                "newTokens": {"drawn": self.drawn, "draws": self.draws,
                              "seen": self.seen.tolist(), "window": self.window.tolist()}}

    def load_state_dicts(self, states: Sequence[dict[str, Any]]) -> None:
        """Every saved rank's state (see DataPipeline.load_state_dicts). On another world size
        the counters are rank 0's (they are summed over ranks every step) and the draw
        counters the largest, so no new rank reuses a coin."""
        if len(states) == self.pipeline.world_size:
            self.load_state_dict(states[self.pipeline.rank])
            return
        self.pipeline.load_state_dicts(states)
        mine = [s["newTokens"] for s in states if "newTokens" in s]
        if mine:
            self._load_counters({**mine[0], "drawn": max(int(m["drawn"]) for m in mine),
                                 "draws": max(int(m["draws"]) for m in mine)})

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True) -> None:
        self.pipeline.load_state_dict(state, strict=strict)
        if state.get("newTokens") is not None:
            self._load_counters(state["newTokens"])

    def _load_counters(self, mine: dict[str, Any]) -> None:
        self.drawn, self.draws = int(mine["drawn"]), int(mine["draws"])
        if len(mine["seen"]) == len(self.seen):
            self.seen = np.array(mine["seen"], dtype=np.int64)
            self.window = np.array(mine["window"], dtype=np.float64)


def _concat(batches: Sequence[Batch]) -> Batch:
    return Batch(input_ids=torch.cat([b.input_ids for b in batches]),
                 labels=torch.cat([b.labels for b in batches]),
                 position_ids=torch.cat([b.position_ids for b in batches]),
                 source_ids=torch.cat([b.source_ids for b in batches]),
                 num_tokens=sum(b.num_tokens for b in batches))


__all__ = ["REPORTED", "NewTokenData"]
