"""Recipe warnings for weights-only starts: printed by `cptctl validate`, posted once by the core."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from cpt_api import CptRunSpec, CptRunStatus
from cpt_api.status import ConditionType
from cpt_operator.cli import main
from cpt_operator.policy.recipes import recipe_warnings
from cpt_operator.reconcile import AttemptState, Emit, Observed, reconcile

EXAMPLE = Path(__file__).parents[3] / "examples" / "tiny-local.yaml"


def spec(**over: Any) -> CptRunSpec:
    doc = yaml.safe_load(EXAMPLE.read_text())["spec"]
    for path, value in over.items():
        node = doc
        *head, last = path.split(".")
        for key in head:
            node = node[key]
        node[last] = value
    return CptRunSpec.model_validate(doc)


@pytest.mark.parametrize("over, says", [
    ({}, []),
    ({"schedule.warmupSteps": 0}, ["warmupSteps is 0"]),
    ({"data.sources": [{"name": "d", "role": "domain", "uri": "/x/*"}]}, ["no replay source"]),
    ({"optimizer.lr": 1e-3}, ["above 0.0003"]),
    ({"schedule.warmupSteps": 0, "optimizer.lr": 1e-3}, ["warmupSteps is 0", "above 0.0003"]),
], ids=["a sound recipe", "no warm-up", "no replay", "an LR above pretraining peaks", "two at once"])
def test_a_weights_only_start_is_warned_about_what_goes_wrong(over: dict[str, Any], says: list[str]) -> None:
    found = recipe_warnings(spec(**over))
    assert len(found) == len(says) and all(s in w for s, w in zip(says, found)), found


def test_a_full_state_start_continues_a_recipe_already_running() -> None:
    full = spec(**{"schedule.warmupSteps": 0}).model_copy(deep=True)
    full.base_model.format, full.base_model.restore_mode = "checkpoint", "fullState"
    assert recipe_warnings(full) == []


def test_the_core_says_it_in_spec_valid_and_posts_each_warning_once() -> None:
    bad = spec(**{"schedule.warmupSteps": 0})
    obs = Observed(attempt=AttemptState(number=0, state="absent"), now="2026-12-06T10:00:00Z")
    first = reconcile(bad, CptRunStatus(), obs)
    valid = first.status.condition(ConditionType.spec_valid)
    assert valid is not None and valid.status == "True" and "warmupSteps is 0" in valid.message
    assert [a.reason for a in first.actions if isinstance(a, Emit) and a.type == "Warning"] == ["RecipeWarning"]
    again = reconcile(bad, first.status, obs)
    assert not [a for a in again.actions if isinstance(a, Emit) and a.reason == "RecipeWarning"]


def test_validate_prints_the_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["optimizer"]["lr"] = 1e-3
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "is valid" in out and "warning: optimizer.lr 0.001 is above" in out
