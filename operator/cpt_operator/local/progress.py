"""What a person sees during `cptctl run`: one progress bar (step, loss, tokens/s, ETA, the last
evaluation's step and each gate's headroom) and a line for every decision and evaluation.
Without a terminal (CI, logs) it prints plain lines instead.

Headroom is `policy.headroom` on the attempt's newest evaluation against the base reference; a
`baseline: best` gate is shown against the base as well (its moving baseline is the decision's
business, not the display's)."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

from cpt_api.evaluation import Placement
from cpt_api.events import Evaluated
from cpt_api.spec import CptRunSpec
from cpt_api.status import CptRunStatus
from ..policy.headroom import Headroom, headroom
from ..policy.types import EvalPoint
from .observe import AttemptLog

WAIT_LINE_S = 15.0
"""Before the first step, a line this often says what the trainer is doing."""


class Progress:
    def __init__(self, spec: CptRunSpec, *, enabled: bool, world_size: int):
        self.spec = spec
        self.total = spec.total_steps(world_size)
        self.bar_enabled = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=self.total, unit="step", dynamic_ncols=True) if self.bar_enabled else None
        self.last_line = 0.0
        self.last_step = -1
        self.last_eval: tuple[int, float] | None = None
        """(step, time) of the evaluation last printed: step alone repeats across attempts."""
        self.waiting_since: tuple[int, float] | None = None
        """(attempt, time) the wait before that attempt's first step began."""
        self.in_place: int | None = None
        """In-place restarts already told (None before the first update: a resumed run's are old)."""

    def note(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        if self.bar is not None:
            self.bar.write(f"{stamp} {message}")
        else:
            print(f"{stamp} {message}", flush=True)

    def gates(self, status: CptRunStatus, ev: Evaluated) -> list[Headroom]:
        point = EvalPoint(attempt=status.attempt, step=ev.step, tokens=ev.tokens, metrics=ev.metrics)
        return headroom(self.spec, status.base_metrics, [point])

    def evaluation(self, status: CptRunStatus, ev: Evaluated) -> None:
        """One line per new evaluation: every metric, then each gate's headroom."""
        if self.last_eval == (ev.step, ev.time):
            return
        self.last_eval = (ev.step, ev.time)
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(ev.metrics.items()))
        what = "base" if ev.is_base else f"step {ev.step}"
        room = ", ".join(h.text() for h in self.gates(status, ev))
        self.note(f"evaluated {what}: {metrics}" + (f" | gate headroom: {room}" if room else ""))

    def update(self, status: CptRunStatus, log: AttemptLog | None) -> None:
        if self.in_place is None:
            self.in_place = status.in_place_restarts
        elif status.in_place_restarts > self.in_place:
            self.in_place = status.in_place_restarts
            origin = log.started.restore_from if log and log.started and log.started.restore_from else "its start"
            self.note(f"attempt {status.attempt}: a trainer process died; torchrun restarted the ranks in place "
                      f"from {origin} (in-place restart {self.in_place} of this run)")
        if log is not None and log.last_eval is not None:
            self.evaluation(status, log.last_eval)
        progress = log.last_progress if log else None
        if progress is None:
            self._waiting(status, log)
            return
        postfix = {"attempt": status.attempt, "loss": "nan" if progress.loss is None else f"{progress.loss:.3f}",
                   "tok/s": f"{progress.tokens_per_s:,.0f}", "lr": f"{progress.lr:.2e}"}
        ev = log.last_eval if log else None
        if ev is not None and not ev.is_base:
            postfix["eval"] = f"@{ev.step}"
            postfix.update({h.gate: h.text().rsplit(" ", 1)[-1] for h in self.gates(status, ev)})
        if self.bar is not None:
            self.bar.n = min(progress.step, self.total)
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.refresh()
        elif progress.step != self.last_step and time.monotonic() - self.last_line > 5:
            self.last_line, self.last_step = time.monotonic(), progress.step
            print(f"step {progress.step}/{self.total} " + " ".join(f"{k}={v}" for k, v in postfix.items()),
                  flush=True)

    def _waiting(self, status: CptRunStatus, log: AttemptLog | None) -> None:
        """Before the first step: what the trainer is doing, every `WAIT_LINE_S` (loading, then
        the base's evaluation, which takes minutes on a real model)."""
        now = time.monotonic()
        if self.waiting_since is None or self.waiting_since[0] != status.attempt:
            self.waiting_since = (status.attempt, now)
        if now - self.last_line < WAIT_LINE_S:
            return
        self.last_line = now
        waited = f"{now - self.waiting_since[1]:.0f} s"
        evaluation = self.spec.evaluation
        if log is None or log.started is None:
            self.note(f"attempt {status.attempt}: loading the model and data ({waited})")
        elif evaluation is not None and evaluation.placement == Placement.inline and log.started.step == 0 \
                and log.started.restore_from is None and not status.base_metrics:
            self.note(f"evaluating the base model on {len(evaluation.suites)} suite(s) before the first step "
                      f"({waited})")
        else:
            self.note(f"attempt {status.attempt}: started, waiting for the first step ({waited})")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
