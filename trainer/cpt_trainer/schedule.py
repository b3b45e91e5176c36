"""Learning-rate schedules: linear warm-up, then a decay to `min_lr` over the run's budget.

`lr(step)` is a pure function of the optimizer step (0-based, the step about to be taken), so
the schedule needs no state of its own: a full-state restore only has to restore the step.

Decay kinds, with p in [0, 1] the fraction of post-warm-up steps done:
- cosine:      min + (peak - min) * (1 + cos(pi p)) / 2
- linear:      peak - (peak - min) * p
- exponential: min + (peak - min) * (e^(-g p) - e^(-g)) / (1 - e^(-g)), g = 5. A plain
               peak * (min/peak)^p never reaches a min of 0; this shape decays by e^-g and
               still lands exactly on min at the end.
- wsd:         warm-up, stable at peak, then linear to min over the last `decay_fraction` of
               all steps (the fast-decay phase where high-quality data is often introduced).
- constant:    peak after warm-up.
Warm-up is linear from peak/warmup at step 0 to peak at step warmup-1 (never an LR of 0: a step
at LR 0 would burn tokens for nothing).

Re-warm: an attempt that went back to a checkpoint (a rollback or tune, `Overrides.rewarm_from`)
scales the schedule's value by (step - rewarm_from + 1) / rewarm_steps over its first
`rewarm_steps` steps: the AdamW moments it restored were fitted to another LR, and resuming
mid-schedule at full strength is the spike the rollback was meant to leave behind. It is part of
the pure function too: a restart of that attempt from a later checkpoint continues the same curve.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from cpt_api.spec import CptRunSpec, DecayKind

_EXP_GAMMA = 5.0


@dataclass(frozen=True)
class Schedule:
    peak: float
    min_lr: float
    warmup: int
    total: int
    decay: DecayKind
    decay_fraction: float = 0.2
    rewarm_from: int | None = None
    rewarm_steps: int = 0

    def __call__(self, step: int) -> float:
        lr = self._scheduled(step)
        if self.rewarm_from is not None and self.rewarm_from <= step < self.rewarm_from + self.rewarm_steps:
            return lr * (step - self.rewarm_from + 1) / self.rewarm_steps
        return lr

    def _scheduled(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if self.decay == DecayKind.constant:
            return self.peak
        if self.decay == DecayKind.wsd:
            return self._wsd(step)
        p = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_lr + (self.peak - self.min_lr) * _decay_factor(self.decay, p)

    def _wsd(self, step: int) -> float:
        decay_steps = max(1, round(self.decay_fraction * self.total))
        start = max(self.warmup, self.total - decay_steps)
        if step < start:
            return self.peak
        p = min(1.0, (step - start) / max(1, self.total - start))
        return self.peak - (self.peak - self.min_lr) * p

    def as_dict(self) -> dict[str, float | int | str | None]:
        return {"peak": self.peak, "minLr": self.min_lr, "warmup": self.warmup,
                "total": self.total, "decay": self.decay.value,
                "decayFraction": self.decay_fraction, "rewarmFrom": self.rewarm_from,
                "rewarmSteps": self.rewarm_steps}


def _decay_factor(kind: DecayKind, p: float) -> float:
    """1 at the start of the decay, 0 at its end."""
    if kind == DecayKind.cosine:
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if kind == DecayKind.linear:
        return 1.0 - p
    if kind == DecayKind.exponential:
        end = math.exp(-_EXP_GAMMA)
        return (math.exp(-_EXP_GAMMA * p) - end) / (1.0 - end)
    raise ValueError(f"no decay factor for {kind.value}")


def build_schedule(spec: CptRunSpec, total: int, lr_scale: float = 1.0,
                   rewarm_from: int | None = None) -> Schedule:
    """The spec's schedule; an attempt's `lr_scale` override scales peak and floor alike, its
    `rewarm_from` re-warms from that step."""
    warmup = min(spec.schedule.warmup_steps, max(0, total - 1))
    return Schedule(peak=spec.optimizer.lr * lr_scale, min_lr=spec.schedule.min_lr * lr_scale,
                    warmup=warmup, total=total, decay=spec.schedule.decay,
                    decay_fraction=spec.schedule.decay_fraction, rewarm_from=rewarm_from,
                    rewarm_steps=spec.schedule.rewarm_steps)
