"""Who owns a checkpoint root and what retention keeps: the pure rules both sides read."""
from __future__ import annotations

import pytest

from cpt_api.manifest import attempt_folder, root_of
from cpt_api.ownership import Pins, RunRecord, import_problem, owner_problem

OWNER = RunRecord(uid="uid-a", name="legal", namespace="ml")


def test_the_owner_may_use_its_root_and_another_run_of_its_namespace_is_told_whose_it_is() -> None:
    assert owner_problem("s3://b/runs/legal", OWNER, OWNER) is None
    problem = owner_problem("s3://b/runs/legal", OWNER, RunRecord(uid="uid-b", name="legal", namespace="ml"))
    assert problem is not None
    assert "s3://b/runs/legal" in problem and "ml/legal" in problem and "uid-a" in problem
    assert "its own checkpoint.uri" in problem


def test_a_run_of_another_namespace_is_told_only_that_the_location_is_taken() -> None:
    problem = owner_problem("s3://b/runs/legal", OWNER, RunRecord(uid="uid-c", name="mine", namespace="team-b"))
    assert problem is not None and "is taken" in problem and "another run" in problem
    assert not any(secret in problem for secret in ("ml", "legal (", "uid-a"))


@pytest.mark.parametrize("uri, root", [
    ("s3://b/runs/legal/attempt-002/step-00000030", "s3://b/runs/legal"),
    ("/runs/x/checkpoints/attempt-001/step-00000003/", "/runs/x/checkpoints"),
    ("s3://b/models/base", None),
    ("/ckpt/step-00000003", None),
], ids=["an s3 checkpoint of a run", "a local one with a trailing slash", "a base model", "a bare step folder"])
def test_the_root_of_a_checkpoint_is_found_from_its_name(uri: str, root: str | None) -> None:
    assert root_of(uri) == root


def test_pins_are_one_sorted_set_of_names_read_per_attempt_folder() -> None:
    pins = Pins.of(["attempt-002/step-00000030", None, "attempt-001/step-00000010",
                    "attempt-002/step-00000030", "attempt-010/step-00000001"])
    assert pins.names == ["attempt-001/step-00000010", "attempt-002/step-00000030", "attempt-010/step-00000001"]
    assert pins.steps_in(attempt_folder(2)) == {"step-00000030"}
    assert pins.steps_in(attempt_folder(1)) == {"step-00000010"}  # not attempt-010's
    assert Pins.model_validate_json(pins.model_dump_json()) == pins


def test_another_runs_checkpoint_is_a_base_only_when_imported() -> None:
    base = "s3://b/runs/legal/attempt-002/step-00000030"
    assert import_problem(base, OWNER, OWNER, imported=False) is None  # its own
    mine = RunRecord(uid="uid-b", name="next", namespace="ml")
    problem = import_problem(base, OWNER, mine, imported=False)
    assert problem and "run ml/legal (uid uid-a)" in problem and "importCheckpoint: true" in problem
    assert import_problem(base, OWNER, mine, imported=True) is None
    other_team = import_problem(base, OWNER, RunRecord(uid="uid-c", name="x", namespace="team-b"), imported=False)
    assert other_team and "another run" in other_team and "uid-a" not in other_team
