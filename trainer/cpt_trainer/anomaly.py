"""Step anomaly detection: do not gamble on anomalous batches.

Rules, checked on every step against the window of recently *accepted* steps (anomalous steps
never enter the window, so a run of spikes cannot raise its own threshold):
- non-finite: the loss or the gradient norm is NaN or Inf;
- grad norm:  ||g_t|| > mean_g + k * std_g;
- loss spike: loss_t > factor * mean_loss.
The statistical rules wait for `min_history` accepted steps: the first steps of a run have no
baseline, and their large, quickly falling grad norms are normal.

Attribution (`blame`): an anomalous step is blamed on the source whose own loss rose most over
its recent accepted mean (a source never seen yet is compared with the run's mean), when that
rise is clearly its own: at least BLAME_MARGIN times the next source's. Junk data spikes one
source; a diverging model lifts them all, and then nobody is blamed.

The detector is pure bookkeeping: the loop decides what an anomaly costs (skip the optimizer
step, restore the last stable checkpoint after `max_consecutive`, or stop). Its state goes into
checkpoints so a resumed run flags exactly what the uninterrupted run would have flagged.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from cpt_api.spec import AnomalySpec

MIN_HISTORY = 10
BLAME_MARGIN = 2.0


@dataclass(frozen=True)
class Verdict:
    kind: str
    """non_finite, grad_norm or loss_spike (the api.events.Anomaly kinds)."""
    value: float
    threshold: float | None
    message: str
    source: str | None = None
    """The source blamed for it, if one stands out."""


class AnomalyDetector:
    def __init__(self, spec: AnomalySpec, min_history: int = MIN_HISTORY):
        self.spec = spec
        self.min_history = min(min_history, spec.window)
        self.losses: deque[float] = deque(maxlen=spec.window)
        self.grad_norms: deque[float] = deque(maxlen=spec.window)
        self.source_losses: dict[str, deque[float]] = {}
        self.consecutive = 0

    def check(self, loss: float, grad_norm: float) -> Verdict | None:
        """What is wrong with this step, if anything (does not change the state)."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            bad = loss if not math.isfinite(loss) else grad_norm
            return Verdict("non_finite", bad, None,
                           f"loss {loss} / grad norm {grad_norm} is not finite")
        if len(self.grad_norms) < self.min_history:
            return None
        mean_g, std_g = _mean_std(self.grad_norms)
        limit = mean_g + self.spec.k * std_g
        if grad_norm > limit:
            return Verdict("grad_norm", grad_norm, limit,
                           f"grad norm {grad_norm:.4g} > mean {mean_g:.4g} + "
                           f"{self.spec.k:g}*std {std_g:.4g}")
        spike = self.spec.loss_spike_factor * _mean_std(self.losses)[0]
        if loss > spike:
            return Verdict("loss_spike", loss, spike,
                           f"loss {loss:.4g} > {self.spec.loss_spike_factor:g} x recent mean")
        return None

    def observe(self, loss: float, grad_norm: float,
                source_losses: Mapping[str, float] | None = None) -> Verdict | None:
        """Check a step and record the outcome: accepted steps join the window, anomalous ones
        are blamed on a source when one stands out."""
        verdict = self.check(loss, grad_norm)
        if verdict is None:
            self.losses.append(loss)
            self.grad_norms.append(grad_norm)
            for name, value in (source_losses or {}).items():
                self.source_losses.setdefault(name, deque(maxlen=self.spec.window)).append(value)
            self.consecutive = 0
            return None
        self.consecutive += 1
        return replace(verdict, source=self.blame(source_losses or {}))

    def blame(self, source_losses: Mapping[str, float]) -> str | None:
        """The source whose loss rose clearly more than any other's, or None."""
        rises = []
        for name, value in source_losses.items():
            history = self.source_losses.get(name) or self.losses
            if history:
                mean = _mean_std(history)[0]
                rises.append((value / mean if math.isfinite(value) else math.inf, name))
        if not rises:
            return None
        rises.sort(reverse=True)
        top, name = rises[0]
        runner = rises[1][0] if len(rises) > 1 else 1.0
        if top <= 1.0 or not math.isfinite(runner):
            return None
        return name if top - 1.0 >= BLAME_MARGIN * max(runner - 1.0, 0.0) else None

    @property
    def needs_restore(self) -> bool:
        return self.consecutive >= self.spec.max_consecutive

    def band(self) -> tuple[float | None, float]:
        """(mean, std) of the accepted grad norms: the band the k-sigma rule draws."""
        if not self.grad_norms:
            return None, 0.0
        return _mean_std(self.grad_norms)

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "gradNorms": list(self.grad_norms),
                "consecutive": self.consecutive,
                "sourceLosses": {n: list(v) for n, v in self.source_losses.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses.clear()
        self.losses.extend(state["losses"])
        self.grad_norms.clear()
        self.grad_norms.extend(state["gradNorms"])
        self.consecutive = state["consecutive"]
        self.source_losses = {n: deque(v, maxlen=self.spec.window)
                              for n, v in state.get("sourceLosses", {}).items()}


def _mean_std(values: deque[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
