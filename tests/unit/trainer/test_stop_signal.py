"""A stop signal is never lost: SIGTERM arriving while the ranks agree whether to stop (inside
the all-reduce, where Python runs the handler as soon as the call returns) used to be
overwritten by that agreement's result, and the attempt trained on until its pods were killed
without a final checkpoint (seen under the test kubelet on a loaded machine)."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from cpt_trainer import distributed, loop


def _attempt() -> Any:
    attempt = loop.Attempt.__new__(loop.Attempt)  # only what `_agree_stop` reads
    attempt.device, attempt.stop_requested, attempt.signalled = torch.device("cpu"), False, False
    return attempt


def test_a_signal_during_the_agreement_stops_the_next_step(monkeypatch: pytest.MonkeyPatch) -> None:
    attempt = _attempt()

    def all_reduce_while_signalled(tensor: torch.Tensor) -> torch.Tensor:
        attempt.signalled = True  # the handler runs while this rank waits in the collective
        return tensor

    monkeypatch.setattr(distributed, "all_reduce_sum", all_reduce_while_signalled)
    assert attempt._agree_stop() is False  # this step's vote was cast before the signal
    assert attempt._agree_stop() is True and attempt.stop_requested  # the next one counts it


def test_a_stop_agreed_stays_agreed(monkeypatch: pytest.MonkeyPatch) -> None:
    attempt = _attempt()
    votes = iter([1.0, 0.0])
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda t: torch.tensor([next(votes)]))
    assert attempt._agree_stop() is True  # another rank was signalled
    assert attempt._agree_stop() is True
