"""The window producer: read -> curate -> tokenise -> mix -> pack, one window at a time.

It runs where the pipeline puts it (a DataLoader worker, or in the training process) and is
the only thing that turns data into windows, so both places give the same windows. Each
window comes from one source, picked by the mixture (`mixture.py`) and packed from that
source's stream (`stream.py`, `packing.py`), so every token of a window has the same source id
and per-source losses and token counts are exact.

Its state after every window travels with the window (`state_dict`, JSON-ready): the
mixture's draw counter and adaptive losses, every stream's position, per-source token counts
and the loss reports not applied yet. Feedback is applied at a fixed point of the window
sequence: a report made after the trainer consumed n windows changes the shares from window
n + FEEDBACK_LAG on, wherever the producer runs and however far it has run ahead.

Token counts: `tokens` are this rank's own since its data position was last dealt, `base` the
run's per-source tokens before that (the same on every rank). The curriculum position is the
run's training tokens, base plus own times the world size (every rank takes equal batches).

Skipped windows (`overrides.skips`, `api.skips`): a window drawn from a source while that
source's consumed tokens (`consumed`, the same run-wide estimate) lie inside a skip window is
packed and thrown away, and the mixture draws again. Packing it advances the stream exactly as
training on it did when the window was found, so the same documents are skipped; its tokens
count as consumed (as they did then) and in `skipped`, not in `windows`.
"""
from __future__ import annotations

import copy
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from cpt_api.spec import Boundary, DataSource, MixtureStrategy
from cpt_api.trainer_config import TrainerConfig

from .curation import Curator, source_quality
from .mixture import Mixture, SourceWeights
from .packing import Window, pack_window
from .positions import fresh
from .report import CurationReport
from .sources import SourceReader
from .stream import SourceStream

STATE_FORMAT = 2
FEEDBACK_LAG = 64
"""Windows between a loss report and the first window it steers. Larger than the worker's
prefetch, so the worker never waits for a report in steady state."""


@dataclass(frozen=True)
class Plan:
    """Everything a producer needs, built once in the training process (listing included)
    and handed to the worker."""

    cfg: TrainerConfig
    readers: list[SourceReader]
    tokenizer: PreTrainedTokenizerBase
    eval_texts: Sequence[str]
    rank: int
    world_size: int
    data_version: str
    report_path: str | None


class Producer:
    def __init__(self, plan: Plan):
        data, packing = plan.cfg.spec.data, plan.cfg.spec.packing
        self.plan = plan
        self.names = [s.name for s in data.sources]
        self._seq_len = packing.seq_len
        self._document_mask = packing.boundary == Boundary.document_mask
        self.report = CurationReport()
        curator = Curator(data.curation, plan.eval_texts, source_quality(data))
        for reader in plan.readers:
            reader.report = self.report
        self.streams = [SourceStream(r, curator, plan.tokenizer, self.report, seed=data.seed,
                                     position=fresh(plan.rank, plan.world_size))
                        for r in plan.readers]
        self.mixture = _mixture(plan.cfg, plan.rank)
        self.tokens = {n: 0 for n in self.names}
        self.base = {n: 0 for n in self.names}
        self.windows = 0
        self.skips = list(plan.cfg.overrides.skips)
        self.skipped = {n: 0 for n in self.names}
        self.pending: list[tuple[int, dict[str, float]]] = []
        self.report_version = 0
        self._tally = self.report.tally()

    @property
    def run_tokens(self) -> int:
        return sum(self.base.values()) + sum(self.tokens.values()) * self.plan.world_size

    def consumed(self, name: str) -> int:
        """The run's consumed tokens of one source (this rank's estimate)."""
        return self.base[name] + self.tokens[name] * self.plan.world_size

    def feed(self, apply_at: int, losses: Mapping[str, float]) -> None:
        """A loss report that steers the mixture from window `apply_at` on."""
        self.pending.append((int(apply_at), dict(losses)))

    def _apply_feedback(self) -> None:
        due = [p for p in self.pending if p[0] <= self.windows]
        self.pending = [p for p in self.pending if p[0] > self.windows]
        for _, losses in sorted(due, key=lambda p: p[0]):
            self.mixture.report_losses(losses)

    def next_window(self) -> Window:
        self._apply_feedback()
        name = self.mixture.next_source(self.run_tokens)
        while any(s.covers(name, self.consumed(name)) for s in self.skips):
            self._pack(name)
            self.skipped[name] += self._seq_len
            name = self.mixture.next_source(self.run_tokens)
        window = self._pack(name)
        self.windows += 1
        self._write_report()
        return window

    def _pack(self, name: str) -> Window:
        index = self.names.index(name)
        window = pack_window(self.streams[index], self._seq_len, self._document_mask, index)
        self.tokens[name] += self._seq_len
        return window

    def _write_report(self) -> None:
        """Write the report when reading moved it (a chunk of documents at a time)."""
        tally = self.report.tally()
        if tally == self._tally:
            return
        self._tally, self.report_version = tally, self.report_version + 1
        if self.plan.report_path is not None:
            self.report.write(self.plan.report_path)

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT, "data_version": self.plan.data_version,
            "rank": self.plan.rank, "world_size": self.plan.world_size,
            "mixture": self.mixture.state_dict(), "tokens": dict(self.tokens),
            "base": dict(self.base), "windows": self.windows, "skipped": dict(self.skipped),
            "feedback": [[a, dict(losses)] for a, losses in self.pending],
            "streams": {s.name: s.state_dict() for s in self.streams},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mixture.load_state_dict(state["mixture"])
        self.tokens = {n: int(state["tokens"].get(n, 0)) for n in self.names}
        self.base = {n: int(state.get("base", {}).get(n, 0)) for n in self.names}
        self.windows = int(state.get("windows", 0))
        self.skipped = {n: int(state.get("skipped", {}).get(n, 0)) for n in self.names}
        self.pending = [(int(a), dict(losses)) for a, losses in state.get("feedback", [])]
        for stream in self.streams:
            if stream.name in state["streams"]:
                stream.load_state_dict(copy.deepcopy(state["streams"][stream.name]))


def report_path(report_dir: str | None, rank: int) -> str | None:
    if report_dir is None:
        return None
    return posixpath.join(report_dir, "curation.json" if rank == 0 else
                          f"curation-rank{rank}.json")


def _mixture(cfg: TrainerConfig, rank: int) -> Mixture:
    data = cfg.spec.data
    mixture = Mixture([_weights(s) for s in data.sources], strategy=data.strategy.value,
                      seed=data.seed, rank=rank, max_boost=data.adaptive_max_boost,
                      replay_delta=cfg.overrides.replay_delta)
    if data.strategy != MixtureStrategy.adaptive:
        mixture.max_boost = 1.0
    return mixture


def _weights(source: DataSource) -> SourceWeights:
    points = tuple((p.tokens, p.weight) for p in source.schedule or ())
    return SourceWeights(source.name, source.role.value, source.weight, points)
