"""How the Indexed Job launcher reads an attempt's end from the Job and its pods."""
from __future__ import annotations

from typing import Any

import pytest

from cpt_api.exit_codes import EXIT_REFUSED
from cpt_operator.kube.launcher import IndexedJobLauncher
from cpt_operator.kube.settings import Settings

FAILED_JOB = {"metadata": {"name": "legal-7b-a1"},
              "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}}


def pod(name: str, exit_code: int, message: str = "") -> dict[str, Any]:
    terminated = {"exitCode": exit_code, "reason": "Error", "message": message}
    return {"metadata": {"name": name}, "status": {"phase": "Failed" if exit_code else "Succeeded",
                                                   "containerStatuses": [{"name": "trainer",
                                                                          "state": {"terminated": terminated}}]}}


@pytest.mark.parametrize("pods, refused, named", [
    ([pod("legal-7b-a1-0-x", EXIT_REFUSED)], True, "legal-7b-a1-0-x exited with code 2"),
    ([pod("legal-7b-a1-0-x", 1), pod("legal-7b-a1-1-y", EXIT_REFUSED)], True, "legal-7b-a1-1-y exited with code 2"),
    ([pod("legal-7b-a1-0-x", 1, "CUDA error")], False, "exited with code 1 (Error) CUDA error"),
    ([], False, "job failed: BackoffLimitExceeded"),
], ids=["the trainer refused its config", "one pod refused, the gang died of it",
        "a crash is not a refusal", "no pod left to tell"])
def test_a_refused_config_is_read_from_the_pods_exit_code(pods, refused, named):
    state = IndexedJobLauncher(Settings()).attempt_state(1, FAILED_JOB, pods)
    assert state.state == "failed" and state.refused is refused
    assert named in state.message
