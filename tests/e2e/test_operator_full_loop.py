"""The full loop on the test cluster with the real trainer: a gate breach that Prometheus scrapes
from the trainer rolls the run back to its last good checkpoint in S3, and the next attempt
trains on from exactly there.

The run is `fault_free_loop` (tests/e2e/full_loop.py): the pods run under the test's `Kubelet`,
which starts each pod's own command on this machine, since kwok runs no container. The fault
suite (tests/faults) compares its faulted twin with this same run.

The scenario is that of tests/integration/test_gate_rollback.py: a tiny Llama taught Python (its
general ability to protect) is trained on license text with far too high an LR and almost no
replay; the gate on the Python suite must catch it and the tuned attempt must not forget.
"""
from __future__ import annotations

from typing import Any

import pytest

from cpt_api.events import Evaluated, Finished, Started
from cpt_api.store import CheckpointRef, list_checkpoints
from tests.e2e.full_loop import GENERAL, RUN, THRESHOLD, TUNE, FaultFree, trainer_events
from tests.e2e.operator_harness import condition

pytestmark = [pytest.mark.cluster, pytest.mark.prometheus, pytest.mark.s3, pytest.mark.slow,
              pytest.mark.timeout(600)]


def prometheus_values(prometheus: Any, promql: str) -> list[float]:
    return [float(v) for series in prometheus.query(promql) for _, v in series.get("values", [series.get("value")])]


def last_good_in_s3(refs: list[CheckpointRef], limit: float, before_step: int) -> CheckpointRef | None:
    """The newest checkpoint of attempt 1 evaluated within the gate before the breach, from the
    manifests alone: what the operator's choice must match."""
    good = [r for r in refs if r.attempt == 1 and r.manifest.step < before_step
            and GENERAL in r.manifest.evals and r.manifest.evals[GENERAL] <= limit]
    return max(good, key=lambda r: r.manifest.step) if good else None


# -- the test ---------------------------------------------------------------------------------
def test_a_breach_scraped_from_the_real_trainer_rolls_back_to_the_last_good_checkpoint_in_s3(
        fault_free_loop: FaultFree, prometheus: Any, monkeypatch: pytest.MonkeyPatch, s3_server: Any) -> None:
    for key, value in s3_server.env.items():  # list_checkpoints below reads the bucket like the trainer
        monkeypatch.setenv(key, value)
    loop = fault_free_loop
    kubelet, namespace, s3_bucket = loop.kubelet, loop.namespace, loop.bucket
    jobs_at_rollback = loop.outcome.jobs_at_rollback

    status = loop.outcome.status
    assert status["phase"] == "Succeeded", status
    assert jobs_at_rollback == [f"{RUN}-a2"], "attempt 1's Job was not deleted on the rollback"
    first, second = kubelet.attempt(1), kubelet.attempt(2)
    assert sorted(p.attempt for p in kubelet.pods.values()) == [1, 2]

    # Attempt 1 was stopped like a pod: deleted while training, it checkpointed and exited on SIGTERM.
    assert first.deleted_while_running, "attempt 1 had finished its budget before the breach was acted on"
    evs1 = trainer_events(first)
    stopped = [e for e in evs1 if isinstance(e, Finished)]
    assert [e.reason for e in stopped] == ["interrupted"]
    base = next(e.metrics for e in evs1 if isinstance(e, Evaluated) and e.is_base)

    # The gate was judged on what Prometheus scraped from the trainer: the baseline exists only
    # there (the base model's evaluation is in no manifest), and it holds attempt 1's evaluations
    # past the limit (the newest may also be in a checkpoint's manifest, which wins at its step).
    record = status["history"][0]
    assert (record["attempt"], record["gate"], record["metric"]) == (1, "forgetting", GENERAL)
    limit = base[GENERAL] * (1 + THRESHOLD)
    selector = f'run="{RUN}",namespace="{namespace}",suite="general"'
    prom_base = prometheus_values(prometheus, f"last_over_time(cpt_eval_base_metric{{{selector}}}[15m])")
    assert prom_base == [pytest.approx(base[GENERAL])]
    assert record["baseline"] == pytest.approx(base[GENERAL]) == status["baseMetrics"][GENERAL]
    scraped = prometheus_values(prometheus, f'cpt_eval_metric{{{selector},attempt="1"}}[15m]')
    assert any(v > limit for v in scraped), (limit, scraped)
    # Per source, the real trainer exports its loss and curation's dropped share (both ranks
    # summed). A source's loss exists from the first step with its tokens: at 2 % replay attempt 1
    # may be stopped before one, attempt 2 (32 %) has them in every step, so both attempts count.
    run_sel = f'run="{RUN}",namespace="{namespace}"'
    for series in ("cpt_source_loss", "cpt_source_dropped_share"):
        found = prometheus.query(f"last_over_time({series}{{{run_sel}}}[15m])")
        assert {r["metric"]["source"] for r in found} == {"legal", "code"}, (series, found)
        values = [float(r["value"][1]) for r in found]
        assert all(0 < v < 20 for v in values) if series == "cpt_source_loss" else all(0 <= v <= 1 for v in values)
    assert record["value"] > limit
    breach_step = min(e.step for e in evs1 if isinstance(e, Evaluated) and not e.is_base
                      and e.metrics[GENERAL] == pytest.approx(record["value"]))

    # The target is the newest checkpoint within the gate, from the manifests in S3.
    root = f"s3://{s3_bucket}/runs/{RUN}"
    refs, problems = list_checkpoints(root)
    good = last_good_in_s3(refs, limit, breach_step)
    assert good is not None, [(r.name, r.manifest.evals) for r in refs]
    assert record["target"] == good.name
    config = loop.second_config
    assert config["restoreFrom"] == f"{root}/{good.name}" and config["restoreMode"] == "fullState"
    assert config["overrides"] == {"lrScale": TUNE["lrFactor"], "replayDelta": TUNE["replayDelta"], "skips": [],
                                   "rewarmFrom": good.manifest.step}
    assert config["checkpointUri"] == f"{root}/attempt-002"

    # Attempt 2 continued from that checkpoint's step and state, and stayed within the gate.
    evs2 = trainer_events(second)
    started = next(e for e in evs2 if isinstance(e, Started))
    assert (started.attempt, started.step, started.restore_from) == (2, good.manifest.step, config["restoreFrom"])
    assert [e.reason for e in evs2 if isinstance(e, Finished)] == ["budget"]
    assert second.proc.returncode == 0
    assert max(e.metrics[GENERAL] for e in evs2 if isinstance(e, Evaluated)) <= limit

    # The run ends with a chosen checkpoint that passed the gate, and the bucket lost nothing:
    # every checkpoint of both attempts verifies, attempt 1's last (saved on SIGTERM) included.
    assert problems == []
    names = {r.name for r in refs}
    assert {r.attempt for r in refs} == {1, 2} and good.name in names
    assert f"attempt-001/step-{stopped[0].step:08d}" in names
    assert status["rollbacks"] == 1 and status["attempt"] == 2
    chosen = next(c for c in status["checkpoints"] if c["name"] == status["bestCheckpoint"])
    assert chosen["passedGates"] and status["bestCheckpoint"] in status["frontier"]
    assert condition(status, "Succeeded")["status"] == "True"
    assert condition(status, "RolledBack")["status"] == "True"
    assert {"AttemptStarted", "RollingBack", "Completed"} <= loop.event_reasons
