"""DataPipeline: sources -> curation -> tokenisation -> mixture -> packed batches, streaming.

Built once per trainer process. Construction only lists the sources and cuts them into units
(`sources.py`; sizes and Parquet footers, read once and handed to every rank by `share`) and
fixes the data version.
Documents are read later, as needed, and only the rank's own units (`positions.py`,
`stream.py`): no rank reads or holds the whole corpus.

Where the work runs. By default a DataLoader worker process runs the producer
(`producer.py`: read, curate, tokenise, mix, pack) and keeps up to PREFETCH_WINDOWS windows
ready, so a training step never waits on tokenisation; `workers=0` runs it in this process.
Both give the same batches: every window comes with the producer's state after it, and the
pipeline's state (`state_dict`) is the state after the last window the *trainer consumed*,
not after what the worker prefetched. Feedback that steers sampling, the adaptive mixture's
`report_losses`, is applied at a fixed window index (FEEDBACK_LAG windows after the report,
see `worker.py`), the same in both places, so exact resume holds with the worker. The
tokenizer extension's oversampling (`extension/data.py`) is a function of the windows and its
own draw counter, and its `observe` / `end_step` only count: neither needs the worker's help.

Resume. `load_state_dict(state)` continues this rank exactly (same world size);
`load_state_dicts(states)` takes every saved rank's state and deals the remaining work of
each source to the current world size (`positions.reshard_pipeline`): every document is
still trained on exactly once per epoch. Weights may change between attempts (replay
override, curriculum, adaptive): each source simply continues from its own position.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from cpt_api.trainer_config import TrainerConfig

from . import worker
from .curation import curation_key
from .packing import Batch, Window, collate
from .positions import reshard_pipeline
from .producer import FEEDBACK_LAG, STATE_FORMAT, Plan, Producer, report_path
from .report import CurationReport
from .sources import UNIT_BYTES, SourceLayout, SourceReader, read_layout

log = logging.getLogger(__name__)

Share = Callable[[Callable[[], list[SourceLayout]]], list[SourceLayout]]
"""Runs a reading of the sources' layouts once and gives its result to every rank (the trainer:
`distributed.from_rank0`; one process: a plain call)."""


def _here(read: Callable[[], list[SourceLayout]]) -> list[SourceLayout]:
    return read()


class DataPipeline:
    def __init__(self, cfg: TrainerConfig, tokenizer: PreTrainedTokenizerBase, rank: int,
                 world_size: int, eval_texts: Sequence[str] = (), report_dir: str | None = None,
                 *, workers: int = 1, unit_bytes: int = UNIT_BYTES, share: Share = _here):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if workers not in (0, 1):
            raise ValueError(f"workers must be 0 or 1 (one producer per rank), not {workers}")
        data = cfg.spec.data
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.source_names = [s.name for s in data.sources]
        self.roles = [s.role.value for s in data.sources]
        layouts = share(lambda: [read_layout(s) for s in data.sources])
        readers = [SourceReader(s, CurationReport(), unit_bytes=unit_bytes, layout=layout)
                   for s, layout in zip(data.sources, layouts)]
        key = curation_key(data, eval_texts)
        hashes = {r.source.name: r.hash for r in readers}
        self.data_version = _data_version(cfg, hashes, key, unit_bytes)
        plan = Plan(cfg, readers, tokenizer, tuple(eval_texts), rank, world_size,
                    self.data_version, report_path(report_dir, rank))
        self._core = Producer(plan)
        """In-process: the producer itself; with a worker: the state after the last window
        consumed (it reads nothing)."""
        self._report = self._core.report.to_dict()
        if plan.report_path is not None:
            self._core.report.write(plan.report_path)
        self._items: Iterator[dict[str, Any]] | None = None
        self._messages: Any = None

    # ---------------------------------------------------------------- batches
    @property
    def tokens_seen(self) -> int:
        return sum(self._core.tokens.values())

    def next_batch(self, batch_size: int) -> Batch:
        return collate([self._next_window() for _ in range(batch_size)])

    def _next_window(self) -> Window:
        if not self.workers:
            return self._core.next_window()
        if self._items is None:
            self._items, self._messages = worker.start(self._core.plan, self.state_dict())
        self._messages.put(("progress", self._core.windows))
        item = next(self._items)
        self._core.load_state_dict({**item["state"], "feedback": self._core.pending})
        self._core.pending = [p for p in self._core.pending if p[0] >= self._core.windows]
        if item["report"] is not None:
            self._report = item["report"]
        return worker.window_of(item["window"])

    def close(self) -> None:
        """Stop the worker (it is also stopped when the pipeline is garbage-collected)."""
        self._items = self._messages = None

    # ---------------------------------------------------------------- feedback, metrics
    def report_losses(self, losses: Mapping[str, float]) -> None:
        apply_at = self._core.windows + FEEDBACK_LAG
        self._core.feed(apply_at, losses)
        if self._messages is not None:
            self._messages.put(("report", apply_at, dict(losses)))

    def current_weights(self) -> dict[str, float]:
        return self._core.mixture.shares(self._core.run_tokens)

    def consumed_tokens(self) -> dict[str, int]:
        """Per source, the run's tokens consumed so far (trained on or skipped): what
        `api.skips` windows are measured in."""
        return {n: self._core.consumed(n) for n in self.source_names}

    def realised_proportions(self) -> dict[str, float]:
        """Share of the run's tokens per source (all ranks, resharded runs included)."""
        ws = self.world_size
        run = {n: self._core.base[n] + t * ws for n, t in self._core.tokens.items()}
        total = sum(run.values())
        return {n: (t / total if total else 0.0) for n, t in run.items()}

    def documents(self) -> tuple[dict[str, int], dict[str, int]]:
        """(read, kept) documents per source on this rank so far: the report's counts, without
        copying the report (the training step reads them every step)."""
        report = self._report if self.workers else {"read": self._core.report.read,
                                                     "kept": self._core.report.kept}
        return report["read"], report["kept"]

    def curation_report(self) -> dict[str, Any]:
        """What this rank's reading has dropped so far (it grows as units are read)."""
        report = self._core.report.to_dict() if not self.workers else self._report
        return {"rank": self.rank, "world_size": self.world_size, **report}

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return self._core.state_dict()

    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        """Continue exactly where `state` was taken. strict refuses another data version or
        another rank / world size (use `load_state_dicts` to change the world size)."""
        if strict:
            self._check(state, same_rank=True)
        self.close()
        self._core.load_state_dict(state)

    def load_state_dicts(self, states: Sequence[Mapping[str, Any]]) -> None:
        """Continue this rank's share of a run saved by `len(states)` ranks (index = old
        rank), on this pipeline's world size: the same as `load_state_dict(states[rank])`
        when the world size is unchanged."""
        for state in states:
            self._check(state, same_rank=False)
        if len(states) == self.world_size:
            self.load_state_dict(states[self.rank])
            return
        self.close()
        self._core.load_state_dict(reshard_pipeline([dict(s) for s in states], self.rank,
                                                    self.world_size))

    def _check(self, state: Mapping[str, Any], *, same_rank: bool) -> None:
        problems = []
        if state.get("format") != STATE_FORMAT:
            problems.append(f"state format {state.get('format')} (expected {STATE_FORMAT})")
        if state.get("data_version") != self.data_version:
            problems.append(f"data version {state.get('data_version')} != {self.data_version}")
        if same_rank and (state.get("rank"), state.get("world_size")) != \
                (self.rank, self.world_size):
            problems.append(f"rank {state.get('rank')}/{state.get('world_size')} != "
                            f"{self.rank}/{self.world_size}")
        if problems:
            raise ValueError("data state does not fit this pipeline: " + "; ".join(problems))


def _data_version(cfg: TrainerConfig, hashes: dict[str, str], curation: str,
                  unit_bytes: int) -> str:
    """sha256 over what fixes the token stream: sources' content, curation, packing, seed and
    the unit size (units are the dedupe scope and what the epoch order permutes)."""
    spec = cfg.spec
    parts = {"sources": [[n, h] for n, h in hashes.items()], "curation": curation,
             "packing": spec.packing.dump(), "seed": spec.data.seed, "unitBytes": unit_bytes}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
