"""The trainers' records in the run's storage: every evaluation reaches the gates once, whatever
Prometheus scraped, and the base's digest recorded at the first start reaches later attempts."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cpt_api import CptRunSpec, CptRunStatus, Phase
from cpt_api.events import Evaluated, Started
from cpt_api.manifest import SKIPS, STARTED, eval_record_name
from cpt_api.skips import SKIP_LIST, DataSkip
from cpt_operator.kube.builders import RunRef, trainer_config
from cpt_operator.kube.observe import observed
from cpt_operator.kube.prometheus import TrainerSeries
from cpt_operator.kube.settings import Settings
from cpt_operator.policy.types import EvalPoint
from cpt_operator.reconcile import AttemptState, Observed, StartAttempt, reconcile
from cpt_operator.records import RunRecords
from cpt_api.store import attempt_dir

BASE = {"general.perplexity": 10.0}


def spec(consecutive: int = 2) -> CptRunSpec:
    return CptRunSpec.model_validate({
        "baseModel": {"uri": "/m", "format": "hf"},
        "data": {"sources": [{"name": "legal", "role": "domain", "uri": "/d/*.txt"}]},
        "budget": {"steps": 100},
        "schedule": {"warmupSteps": 5},
        "checkpoint": {"uri": "s3://bucket/runs/r"},
        "evaluation": {"every": 10, "suites": [{"name": "general", "kind": "general", "uri": "/e/g.jsonl"}]},
        "gates": [{"name": "forgetting", "suite": "general", "threshold": 0.1, "consecutive": consecutive}],
    })


def record(root: Path, attempt: int, step: int, value: float | None = None, *, base: bool = False) -> Path:
    path = Path(attempt_dir(str(root), attempt)) / eval_record_name(step)
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = BASE if base else {"general.perplexity": value}
    path.write_text(Evaluated(step=step, tokens=step * 10, metrics=metrics, is_base=base, time=1.0)
                    .model_dump_json(by_alias=True))
    return path


def started(root: Path, attempt: int, digest: str | None) -> None:
    path = Path(attempt_dir(str(root), attempt)) / STARTED
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(Started(attempt=attempt, step=0, tokens=0, base_sha256=digest, time=1.0)
                    .model_dump_json(by_alias=True))


def body() -> dict[str, Any]:
    return {"metadata": {"name": "r", "namespace": "ns", "generation": 1}}


def test_an_evaluation_prometheus_never_scraped_still_counts_towards_the_gate(tmp_path):
    """Two breaching evaluations between scrapes: Prometheus saw only the second, so by it alone
    the gate (2 in a row) would wait; the records give both, each counted once."""
    record(tmp_path, 1, 0, base=True)
    record(tmp_path, 1, 10, 12.0)
    record(tmp_path, 1, 20, 12.5)
    scraped = [EvalPoint(attempt=1, step=20, metrics={"general.perplexity": 12.5})]
    series = TrainerSeries(points=scraped, step=20)
    running = AttemptState(number=1, state="running")
    status = CptRunStatus(phase=Phase.running, attempt=1, base_metrics=BASE)

    blind = observed(body=body(), attempt=running, series=series, points=scraped, refs=[])
    assert reconcile(spec(), status, blind).status.phase == Phase.running

    obs = observed(body=body(), attempt=running, series=series, points=scraped, refs=[],
                   records=RunRecords(str(tmp_path)).read())
    assert [(p.attempt, p.step) for p in obs.points] == [(1, 10), (1, 20)]
    assert obs.base == BASE
    plan = reconcile(spec(), status, obs)
    assert plan.status.phase == Phase.rolling_back
    assert plan.status.history[0].gate == "forgetting"


def test_each_record_is_read_once_and_files_being_written_are_skipped(tmp_path):
    records = RunRecords(str(tmp_path))
    first = record(tmp_path, 1, 10, 11.0)
    assert [p.step for p in records.read().points] == [10]
    first.write_text("{not json")  # records are immutable: a second read would be a waste
    (first.parent / "step-00000020.json.tmp").write_text("{half")
    record(tmp_path, 2, 30, 10.5)
    points = records.read().points
    assert [(p.attempt, p.step, dict(p.metrics)) for p in points] == [
        (1, 10, {"general.perplexity": 11.0}), (2, 30, {"general.perplexity": 10.5})]


def test_a_missing_root_has_no_records(tmp_path):
    assert RunRecords(str(tmp_path / "nothing")).read().points == []


def test_the_first_started_attempt_gives_the_digest_the_run_records(tmp_path):
    started(tmp_path, 1, None)  # crashed before hashing the base
    started(tmp_path, 2, "a" * 64)
    started(tmp_path, 3, "b" * 64)
    assert RunRecords(str(tmp_path)).read().base_sha256 == "a" * 64


def test_the_recorded_digest_is_kept_and_given_to_every_later_attempt():
    failed = AttemptState(number=1, state="failed", message="node lost")
    status = CptRunStatus(phase=Phase.running, attempt=1)
    plan = reconcile(spec(), status, Observed(attempt=failed, now="t", base_sha256="a" * 64))
    assert plan.status.base_sha256 == "a" * 64
    start = next(a for a in plan.actions if isinstance(a, StartAttempt))
    assert start.number == 2 and start.restore_from is None and start.base_sha256 == "a" * 64
    config = trainer_config(RunRef(name="r", namespace="ns", uid="u"), spec(), start, Settings())
    assert json.loads(config.dump_json())["baseSha256"] == "a" * 64

    # a later attempt reporting other bytes does not rewrite what the run recorded
    again = reconcile(spec(), plan.status, Observed(attempt=AttemptState(number=2, state="running"),
                                                    now="t", base_sha256="b" * 64))
    assert again.status.base_sha256 == "a" * 64


def skips(root: Path, attempt: int, *windows: DataSkip) -> None:
    path = Path(attempt_dir(str(root), attempt)) / SKIPS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(SKIP_LIST.dump_json(list(windows), by_alias=True))


def test_the_windows_an_attempt_skipped_reach_the_operator_as_they_grow(tmp_path):
    """On a cluster anomalies reach the operator only as counts; the attempt's skips.json says
    which data to skip, and it is read again each pass (the trainer widens a window in place)."""
    records = RunRecords(str(tmp_path))
    legal = DataSkip(source="legal", start=1000, end=1500, attempt=1, step=7)
    skips(tmp_path, 1, legal)
    state = AttemptState(number=1, state="running")
    assert observed(body=body(), attempt=state, series=None, points=[], refs=[],
                    records=records.read()).skips == (legal,)
    wider = legal.model_copy(update={"end": 2200})
    skips(tmp_path, 1, wider)
    obs = observed(body=body(), attempt=state, series=None, points=[], refs=[], records=records.read())
    assert obs.skips == (wider,)
    # another attempt's windows are its own
    other = observed(body=body(), attempt=AttemptState(number=2, state="running"), series=None, points=[],
                     refs=[], records=records.read())
    assert other.skips == ()
