"""Read what the trainers recorded in the run's storage: every evaluation, every start, and the
data windows each attempt skipped.

Each attempt's folder (`<checkpoint root>/attempt-NNN/`, see `store`) holds `started.json` and
`evals/step-XXXXXXXX.json` (names in `api.manifest`), each written once and never changed, and
`skips.json`, rewritten while its attempt runs (so read again each time). The evaluations
are the durable account of the evaluations: Prometheus gauges hold only the latest value, so
two evaluations between scrapes would hide the first from the gates.

Both backends read them through `RunRecords` (each file once: records are immutable) and merge
them with what else they saw through `merge_points`: a point is one evaluation, identified by
(attempt, step), so it counts once however many sources saw it.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Iterable, Sequence, TypeVar

import fsspec
from pydantic import ValidationError

from cpt_api.events import Evaluated, Started
from cpt_api.manifest import EVALS_DIR, SKIPS, STARTED, attempt_of, is_eval_record
from cpt_api.skips import SKIP_LIST, DataSkip
from cpt_api.storage import storage_options
from .policy.types import CheckpointEvals, EvalPoint
from cpt_api.store import CheckpointRef

R = TypeVar("R", Evaluated, Started)


@dataclass(frozen=True, kw_only=True)
class Records:
    """What the records of a run say so far."""

    points: list[EvalPoint] = field(default_factory=list)
    """Evaluations of the model being trained, by attempt and step (the base's excluded)."""
    base: dict[str, float] = field(default_factory=dict)
    """The base model's reference evaluation (the first attempt that measured it)."""
    base_sha256: str | None = None
    """The base's digest as the first attempt that started verified it."""
    skips: dict[int, list[DataSkip]] = field(default_factory=dict)
    """By attempt: the data windows it blamed for its restores (api.skips)."""
    of_checkpoints: frozenset[tuple[int, int]] = frozenset()
    """(attempt, step) of every record that names the checkpoint it evaluated."""


class RunRecords:
    """The records under one checkpoint root, each file read once across calls."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self._evals: dict[tuple[int, str], Evaluated] = {}
        self._started: dict[int, Started] = {}
        self._skips: dict[int, list[DataSkip]] = {}

    def read(self) -> Records:
        fs, base = fsspec.core.url_to_fs(self.root, **storage_options(self.root))
        for path in self._ls(fs, base):
            attempt = attempt_of(posixpath.basename(path.rstrip('/')))
            if attempt is not None:
                self._read_attempt(fs, path.rstrip("/"), attempt)
        return self._records()

    @staticmethod
    def _ls(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
        fs.invalidate_cache(path)  # listings are cached per filesystem; trainers write behind our back
        try:
            return sorted(fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    def _read_attempt(self, fs: fsspec.AbstractFileSystem, path: str, attempt: int) -> None:
        try:
            self._skips[attempt] = SKIP_LIST.validate_json(fs.cat_file(f"{path}/{SKIPS}"))
        except (FileNotFoundError, ValidationError, ValueError):
            pass  # none found yet (written atomically: never half a file)
        if attempt not in self._started:
            started = self._parse(fs, f"{path}/{STARTED}", Started)
            if started is not None:
                self._started[attempt] = started
        for file in self._ls(fs, f"{path}/{EVALS_DIR}"):
            key = (attempt, posixpath.basename(file))
            if key in self._evals or not is_eval_record(file):
                continue
            record = self._parse(fs, file, Evaluated)
            if record is not None:
                self._evals[key] = record

    @staticmethod
    def _parse(fs: fsspec.AbstractFileSystem, path: str, model: type[R]) -> R | None:
        """The record, or None when it is absent or unreadable (a reader never sees a partial
        record, so an unreadable one stays unreadable: it is skipped, not fatal)."""
        try:
            return model.model_validate_json(fs.cat_file(path))
        except (FileNotFoundError, ValidationError, ValueError):
            return None

    def _records(self) -> Records:
        points: list[EvalPoint] = []
        base: dict[str, float] = {}
        for (attempt, _), ev in sorted(self._evals.items()):
            if ev.is_base:
                base = base or dict(ev.metrics)
            else:
                points.append(EvalPoint(attempt=attempt, step=ev.step, tokens=ev.tokens,
                                        metrics=dict(ev.metrics)))
        digest = next((s.base_sha256 for _, s in sorted(self._started.items()) if s.base_sha256), None)
        named = frozenset((attempt, ev.step) for (attempt, _), ev in self._evals.items()
                          if ev.checkpoint is not None and not ev.is_base)
        return Records(points=points, base=base, base_sha256=digest, skips=dict(self._skips),
                       of_checkpoints=named)


def merge_points(scraped: Iterable[EvalPoint], recorded: Iterable[EvalPoint],
                 refs: Sequence[CheckpointRef]) -> list[EvalPoint]:
    """One point per (attempt, step): a scraped value is replaced by the record of the same
    evaluation, and that by the checkpoint manifest's, which alone names a checkpoint (only a
    checkpoint that exists can be a rollback target)."""
    merged = {(p.attempt, p.step): p for p in scraped}
    merged.update({(p.attempt, p.step): p for p in recorded})
    for ref in refs:
        m, key = ref.manifest, (ref.attempt, ref.manifest.step)
        if not m.evals and key not in merged:
            continue
        # a separate evaluation's record holds the suites, the manifest what the trainer added
        metrics = {**(merged[key].metrics if key in merged else {}), **m.evals}
        merged[key] = EvalPoint(attempt=ref.attempt, step=m.step, tokens=m.tokens, metrics=metrics,
                                checkpoint=ref.name, stable=m.stable)
    return [merged[k] for k in sorted(merged)]


def checkpoint_evals(refs: Sequence[CheckpointRef], records: Records) -> list[CheckpointEvals]:
    """The run's checkpoints with their evaluations: the manifest's (an inline evaluation)
    merged with the record that names the checkpoint (a separate one)."""
    points = {(p.attempt, p.step): p for p in records.points}
    out = []
    for r in refs:
        key = (r.attempt, r.manifest.step)
        recorded = dict(points[key].metrics) if key in points and key in records.of_checkpoints else {}
        out.append(CheckpointEvals(name=r.name, step=r.manifest.step, tokens=r.manifest.tokens,
                                   evals={**recorded, **r.manifest.evals}, attempt=r.attempt,
                                   stable=r.manifest.stable, evaluated=key in records.of_checkpoints))
    return out
