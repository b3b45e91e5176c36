"""The run layout is spelled once (api.manifest): folder names are made and parsed by one pair."""
from __future__ import annotations

import pytest

from cpt_api.manifest import attempt_folder, attempt_of, checkpoint_name


@pytest.mark.parametrize("number", [1, 7, 999, 1000, 12345])
def test_an_attempt_folder_parses_back_to_its_number(number: int) -> None:
    assert attempt_of(attempt_folder(number)) == number
    assert attempt_of(f"s3://bucket/runs/r/{attempt_folder(number)}/") == number
    assert attempt_of(f"{attempt_folder(number)}/{checkpoint_name(40)}") == number


@pytest.mark.parametrize("name", ["step-00000040", "attempt-", "attempt-x1", "attempts", "", "pinned.json"])
def test_other_names_are_not_attempts(name: str) -> None:
    assert attempt_of(name) is None
