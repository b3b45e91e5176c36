"""What a person sees during `cptctl run`: one progress bar (step, loss, tokens/s, ETA) and a
line for every decision. Without a terminal (CI, logs) it prints plain lines instead."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

from ..api.spec import CptRunSpec
from ..api.status import CptRunStatus
from .observe import AttemptLog


class Progress:
    def __init__(self, spec: CptRunSpec, *, enabled: bool, world_size: int):
        self.total = spec.total_steps(world_size)
        self.bar_enabled = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=self.total, unit="step", dynamic_ncols=True) if self.bar_enabled else None
        self.last_line = 0.0
        self.last_step = -1

    def note(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        if self.bar is not None:
            self.bar.write(f"{stamp} {message}")
        else:
            print(f"{stamp} {message}", flush=True)

    def update(self, status: CptRunStatus, log: AttemptLog | None) -> None:
        progress = log.last_progress if log else None
        if progress is None:
            return
        postfix = {"attempt": status.attempt, "loss": "nan" if progress.loss is None else f"{progress.loss:.3f}",
                   "tok/s": f"{progress.tokens_per_s:,.0f}", "lr": f"{progress.lr:.2e}"}
        if self.bar is not None:
            self.bar.n = min(progress.step, self.total)
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.refresh()
        elif progress.step != self.last_step and time.monotonic() - self.last_line > 5:
            self.last_line, self.last_step = time.monotonic(), progress.step
            print(f"step {progress.step}/{self.total} " + " ".join(f"{k}={v}" for k, v in postfix.items()),
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
