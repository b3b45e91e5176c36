"""`cptctl export RUN [CHECKPOINT]`: which checkpoint a command line names (no torch)."""
from __future__ import annotations

from pathlib import Path

import pytest

from cpt_api.status import CptRunStatus
from cpt_operator.local.commands import export_source

STEP3, STEP6 = "step-00000003", "step-00000006"


@pytest.fixture
def run(tmp_path: Path) -> Path:
    for attempt, step in (("attempt-001", STEP3), ("attempt-001", STEP6), ("attempt-002", STEP3)):
        (tmp_path / "checkpoints" / attempt / step).mkdir(parents=True)
    (tmp_path / "status.json").write_text(CptRunStatus().model_dump_json())
    return tmp_path


def chosen(run: Path, name: str) -> None:
    (run / "status.json").write_text(CptRunStatus(best_checkpoint=name).model_dump_json())


@pytest.mark.parametrize("checkpoint, choice, expected", [
    pytest.param(None, "attempt-001/" + STEP6, ["checkpoints/attempt-001/" + STEP6],
                 id="by default the run's chosen checkpoint"),
    pytest.param(None, None, ["--latest-under", "checkpoints"],
                 id="without a choice the newest valid one, found by the tool"),
    pytest.param(STEP3, "attempt-001/" + STEP6, ["checkpoints/attempt-002/" + STEP3],
                 id="a step name is taken from the latest attempt that has it"),
    pytest.param("attempt-001/" + STEP3, None, ["checkpoints/attempt-001/" + STEP3],
                 id="an attempt/step name is taken as it is"),
    pytest.param("s3://b/p/" + STEP3, None, ["s3://b/p/" + STEP3], id="a URI is taken as it is"),
])
def test_a_run_and_a_checkpoint_name_one_checkpoint(run, checkpoint, choice, expected):
    if choice:
        chosen(run, choice)
    got = export_source(str(run), checkpoint)
    where = [a for a in got if a != "--why"][: len(expected)]
    assert where == [e if e.startswith(("s3:", "--")) else str(run / e) for e in expected]


@pytest.mark.parametrize("run_arg, checkpoint, error", [
    pytest.param("s3://bucket/prefix/" + STEP3, None, None,
                 id="a checkpoint URI stands for a cluster run's checkpoint"),
    pytest.param("s3://bucket/prefix/" + STEP3, STEP6, ValueError,
                 id="a checkpoint URI with another checkpoint is ambiguous"),
    pytest.param("no-such-run", None, FileNotFoundError, id="an unknown run is an error"),
])
def test_a_checkpoint_uri_instead_of_a_run(run_arg, checkpoint, error):
    if error is None:
        assert export_source(run_arg, checkpoint) == [run_arg]
    else:
        with pytest.raises(error):
            export_source(run_arg, checkpoint)


def test_an_unknown_step_name_is_an_error(run):
    with pytest.raises(FileNotFoundError, match="no checkpoint step-00000009"):
        export_source(str(run), "step-00000009")


def test_a_run_that_chose_the_base_exports_nothing_by_default_but_a_named_checkpoint(run: Path) -> None:
    chosen(run, "base")
    with pytest.raises(ValueError, match="none is better than the base"):
        export_source(str(run), None)
    got = export_source(str(run), "attempt-001/" + STEP6)
    assert Path(got[0]) == run / "checkpoints" / "attempt-001" / STEP6
