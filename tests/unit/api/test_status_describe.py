"""`cptctl status` prints one description of a status, for local and cluster runs alike."""
from __future__ import annotations

from cpt_api.status import CptRunStatus, Phase, RollbackRecord


def test_a_rollback_is_described_with_the_value_that_breached():
    status = CptRunStatus(phase=Phase.running, attempt=2, rollbacks=1, restore_from="attempt-001/step-00000010",
                          history=[RollbackRecord(attempt=1, gate="forgetting", target="attempt-001/step-00000010",
                                                  metric="general.perplexity", value=52.0, baseline=40.0,
                                                  reason="general.perplexity 30% above base")])
    text = status.describe("team-a/legal")
    assert text.splitlines()[0] == "run:         team-a/legal"
    assert "attempt:     2 (from attempt-001/step-00000010; lr x1, replay +0)" in text
    assert "  - attempt 1: forgetting general.perplexity=52 (baseline 40) -> attempt-001/step-00000010" in text

