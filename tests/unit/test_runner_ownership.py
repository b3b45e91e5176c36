"""`cptctl run`: a run directory is one run. Running it again resumes its own checkpoints; a
second run directory pointing at the same checkpoint.uri is refused before anything starts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cpt_api.manifest import RUN_RECORD
from cpt_operator.local.rundir import RunDir
from cpt_operator.local.runner import LocalRun, RunError, run_local
from cpt_api import load_run
from cpt_operator.local.progress import Progress

EXAMPLE = Path(__file__).parents[2] / "examples" / "tiny-local.yaml"


def _run_file(tmp_path: Path, root: Path) -> Path:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["checkpoint"] = {"uri": str(root)}
    doc["spec"]["resources"] = {}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _local(file: Path, run_dir: Path) -> LocalRun:
    run = load_run(file)
    return LocalRun(run, RunDir(run_dir), 1, Progress(run.spec, enabled=False, world_size=1))


def test_the_same_run_directory_keeps_its_claim(tmp_path: Path) -> None:
    file, root = _run_file(tmp_path, tmp_path / "ckpt"), tmp_path / "ckpt"
    (tmp_path / "a").mkdir()
    _local(file, tmp_path / "a").claim()
    uid = json.loads((root / RUN_RECORD).read_text())["uid"]
    _local(file, tmp_path / "a").claim()  # a resume
    assert json.loads((root / RUN_RECORD).read_text())["uid"] == uid == RunDir(tmp_path / "a").run_id


def test_another_run_directory_on_the_same_checkpoint_uri_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = _run_file(tmp_path, tmp_path / "ckpt")
    (tmp_path / "a").mkdir()
    _local(file, tmp_path / "a").claim()
    (tmp_path / "b").mkdir()
    with pytest.raises(RunError, match="belongs to run local/"):
        _local(file, tmp_path / "b").claim()
    assert run_local(str(file), run_dir=str(tmp_path / "b"), progress=False) == 2
    assert "belongs to run local/" in capsys.readouterr().err
    assert not (tmp_path / "b" / "attempt-001").exists()


def test_a_plan_that_prunes_waits_for_pins_the_store_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As the operator holds such a plan (CheckpointsPinned=False), `cptctl run` holds it: nothing
    of it is carried out, it is noted once, and the next pass that can write the pins goes on."""
    from cpt_api.spec import RestoreMode
    from cpt_api.status import CptRunStatus, Overrides
    from cpt_operator.local import runner
    from cpt_operator.reconcile import Pin, Plan, StartAttempt

    (tmp_path / "a").mkdir()
    local = _local(_run_file(tmp_path, tmp_path / "ckpt"), tmp_path / "a")
    notes: list[str] = []
    monkeypatch.setattr(local.progress, "note", notes.append)
    started: list[int] = []
    monkeypatch.setattr(local, "start", lambda action: started.append(action.number))
    pins = Pin(("attempt-001/step-00000010",), (("attempt-001", 10),))
    plan = Plan((pins, StartAttempt(2, "attempt-001/step-00000010", RestoreMode.full_state, Overrides(), "restart")),
                CptRunStatus())

    def refuse(*args: object) -> None:
        raise OSError("SlowDown: please reduce your request rate")

    monkeypatch.setattr(runner, "pin", refuse)
    for _ in range(2):
        local.carry_out(plan)
    assert started == [] and local.pinned is None
    assert len(notes) == 1 and notes[0].startswith("[PinFailed] pinning attempt-001/step-00000010 failed (retrying)")
    monkeypatch.setattr(runner, "pin", lambda *args: None)
    local.carry_out(plan)
    assert started == [2] and local.pinned == pins
