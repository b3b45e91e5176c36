"""What `cptctl run` prints without a terminal: each evaluation once, with the gates' headroom,
and the step lines carry the last evaluation and the headroom too."""
from __future__ import annotations

from pathlib import Path

import pytest

from cpt_api.events import Evaluated, Progress as ProgressEvent
from cpt_api.spec import CptRunSpec
from cpt_api.status import CptRunStatus
from cpt_operator.local.events import EventFollower
from cpt_operator.local.observe import AttemptLog
from cpt_operator.local.progress import Progress


def printed(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The lines printed, without their time stamps."""
    return [line.split(" ", 1)[1] for line in capsys.readouterr().out.splitlines()]


def spec() -> CptRunSpec:
    return CptRunSpec.model_validate({
        "baseModel": {"uri": "/m"}, "data": {"sources": [{"name": "d", "role": "domain", "uri": "/d"}]},
        "budget": {"steps": 12}, "schedule": {"warmupSteps": 1},
        "evaluation": {"suites": [{"name": "general", "kind": "general", "uri": "/g"}]},
        "gates": [{"name": "general-ppl", "suite": "general", "threshold": 0.1}]})


def test_plain_lines_show_the_last_evaluation_and_gate_headroom(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    shown = Progress(spec(), enabled=False, world_size=1)
    status = CptRunStatus(attempt=1, base_metrics={"general.perplexity": 40.0})
    log = AttemptLog(1, EventFollower(tmp_path / "events.jsonl"))
    log.last_eval = Evaluated(step=6, tokens=6144, metrics={"general.perplexity": 42.0}, time=0.0)
    log.last_progress = ProgressEvent(step=7, tokens=7168, loss=2.5, lr=1e-4, grad_norm=1.0,
                                      tokens_per_s=900.0, time=0.0)
    shown.update(status, log)
    shown.update(status, log)  # the same evaluation is not printed twice
    out = capsys.readouterr().out.splitlines()
    assert len([line for line in out if "evaluated step 6" in line]) == 1
    assert out[0].endswith("evaluated step 6: general.perplexity=42 | gate headroom: general-ppl +5.0%")
    assert out[1] == "step 7/12 attempt=1 loss=2.500 tok/s=900 lr=1.00e-04 eval=@6 general-ppl=+5.0%"


def test_the_same_step_evaluated_by_the_next_attempt_is_printed_again(
        capsys: pytest.CaptureFixture[str]) -> None:
    shown = Progress(spec(), enabled=False, world_size=1)
    status = CptRunStatus(attempt=2, base_metrics={"general.perplexity": 40.0})
    shown.evaluation(status, Evaluated(step=3, tokens=3072, metrics={"general.perplexity": 70.0}, time=1.0))
    shown.evaluation(status, Evaluated(step=3, tokens=3072, metrics={"general.perplexity": 41.0}, time=2.0))
    out = capsys.readouterr().out
    assert "general-ppl -65.0%" in out and "general-ppl +7.5%" in out


def test_before_the_first_step_a_line_says_what_the_trainer_is_doing(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from cpt_api.events import Started
    from cpt_operator.local import progress

    clock = iter([100.0, 110.0, 120.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    shown = Progress(spec(), enabled=False, world_size=1)
    status = CptRunStatus(attempt=1)
    log = AttemptLog(1, EventFollower(tmp_path / "events.jsonl"))
    shown.update(status, log)  # t=100: loading
    log.started = Started(attempt=1, step=0, tokens=0, time=0.0)
    shown.update(status, log)  # t=110: within the interval, nothing
    shown.update(status, log)  # t=120: 20 s in, evaluating the base
    assert printed(capsys) == ["attempt 1: loading the model and data (0 s)",
                   "evaluating the base model on 1 suite(s) before the first step (20 s)"]


def test_the_wait_of_a_later_attempt_counts_from_that_attempt(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from cpt_operator.local import progress

    clock = iter([100.0, 300.0, 320.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    shown = Progress(spec(), enabled=False, world_size=1)
    shown.update(CptRunStatus(attempt=1), AttemptLog(1, EventFollower(tmp_path / "a1.jsonl")))  # t=100
    log = AttemptLog(2, EventFollower(tmp_path / "a2.jsonl"))
    shown.update(CptRunStatus(attempt=2), log)  # t=300: a rollback started attempt 2
    shown.update(CptRunStatus(attempt=2), log)  # t=320
    assert printed(capsys) == ["attempt 1: loading the model and data (0 s)",
                               "attempt 2: loading the model and data (0 s)",
                               "attempt 2: loading the model and data (20 s)"]

