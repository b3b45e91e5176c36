"""Which separate evaluations to start, and what is still owed (`evaluation.placement: separate`).

Each checkpoint is evaluated once, in a process or Job of its own, and the base first (the
gates' baseline). Oldest first, so that evaluations land in the order the gates judge
them; at most `evaluation.concurrency` at a time. An evaluation retried by its backend and still
failing is reported, never skipped silently: its checkpoint stays unjudged (never chosen, never a
rollback target) and the run says which one and why.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

from .types import BASE, CheckpointEvals

EvalState = Literal["running", "failed"]


@dataclass(frozen=True, kw_only=True)
class EvalRun:
    """What a backend sees of one target's evaluation (absent: none was started, or it ended
    with its record written)."""

    state: EvalState
    message: str = ""


@dataclass(frozen=True, kw_only=True)
class EvalPlan:
    start: tuple[str, ...] = ()
    """Targets (`base` or a checkpoint name) to start evaluating now."""
    owed: tuple[str, ...] = ()
    """Every target not evaluated yet that can still be (running, queued, or started now)."""
    failed: tuple[tuple[str, str], ...] = ()
    """(target, why) of evaluations that failed after their retries."""

    @property
    def done(self) -> bool:
        return not self.owed


def plan_evaluations(*, base_known: bool, checkpoints: Sequence[CheckpointEvals],
                     runs: Mapping[str, EvalRun], concurrency: int) -> EvalPlan:
    targets = [] if base_known else [BASE]
    targets += [c.name for c in sorted(checkpoints, key=lambda c: (c.attempt, c.step)) if not c.evaluated]
    running = [t for t, r in runs.items() if r.state == "running"]
    failed = tuple((t, runs[t].message) for t in targets if t in runs and runs[t].state == "failed")
    owed = [t for t in targets if t not in dict(failed)]
    # the base first: no checkpoint can be judged against it before it is known
    queue = [t for t in owed if t not in runs]
    free = max(0, concurrency - len(running))
    start = queue[:free]
    # a running evaluation whose checkpoint is gone (retention, a deleted folder) is not stopped:
    # it fails on its own, and the next pass sees it as failed
    return EvalPlan(start=tuple(start), owed=tuple(owed), failed=failed)


__all__ = ["EvalPlan", "EvalRun", "EvalState", "plan_evaluations"]
