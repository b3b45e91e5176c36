"""Waiting between tries of a start the cluster refused for now (a full ResourceQuota, an
admission webhook or policy, permissions the operator lacks): doubling delays, so a refusal that
lasts hours costs a few API calls, and one that passes is noticed within seconds at first."""
from __future__ import annotations

from dataclasses import dataclass

FIRST_S = 5.0
MAX_S = 300.0


@dataclass
class Backoff:
    failures: int = 0
    not_before: float = 0.0
    """Monotonic time before which the next try is not made."""

    def failed(self, now: float) -> float:
        """Count a refusal at `now`; the delay until the next try."""
        self.failures += 1
        delay = min(MAX_S, FIRST_S * 2.0 ** (self.failures - 1))
        self.not_before = now + delay
        return delay

    def waiting(self, now: float) -> bool:
        return now < self.not_before
