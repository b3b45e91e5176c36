"""The trainer's account of its time: nested parts, commits, and a restarted trainer carrying
its predecessor's report on (the event log, not torchrun's per-node count, says it restarted)."""
from __future__ import annotations

import json
import time

import pytest

from cpt_api.manifest import EVENTS
from cpt_trainer.goodput import RESTART_ENV, TimeAccount, last_report, process_start


def test_a_step_excludes_the_evaluation_and_save_timed_inside_it(tmp_path):
    clock = TimeAccount(str(tmp_path), started=time.time())
    clock.started(0)
    with clock.step():
        time.sleep(0.02)
        with clock.timed("evaluating"):
            time.sleep(0.05)
        clock.saving(1)
        with clock.timed("checkpointing"):
            time.sleep(0.03)
    t = clock.report(1)
    assert t.evaluating >= 0.05 and t.checkpointing >= 0.03
    assert 0.02 <= t.steps < 0.05  # the nested 0.08 s are not step time
    assert t.committed == 0
    clock.committed(1)
    assert clock.report(1).committed == pytest.approx(t.steps, abs=0.005) and clock.restarts == 0


def test_a_restarted_trainer_carries_the_last_report_on(tmp_path, monkeypatch):
    monkeypatch.delenv(RESTART_ENV, raising=False)
    before = {"began": 100.0, "reported": 200.0, "firstStep": 4, "step": 30, "restoring": 20.0, "steps": 70.0,
              "committed": 50.0, "restarts": 0}
    with open(tmp_path / EVENTS, "w") as f:
        f.write(json.dumps({"event": "progress", "times": before}) + "\n")
        f.write('{"event": "progress", "tim')  # the line the killed trainer was writing
    assert last_report(str(tmp_path)).steps == 70
    clock = TimeAccount(str(tmp_path), started=230.0)
    clock.started(27)  # restored from its newest checkpoint, step 27
    t = clock.times
    assert clock.restarts == 1 and t.restarts == 1  # from the log, though this node's count is 0
    assert (t.began, t.first_step, t.step) == (100.0, 4, 27)
    assert t.steps == 50 and t.lost_steps == 20  # the 20 s after the checkpoint are lost
    assert t.failures == pytest.approx(30.0)  # from the last report to this process's start
    assert t.restoring > 20


def test_a_first_start_begins_at_the_process_start(tmp_path):
    clock = TimeAccount(str(tmp_path))
    assert clock.restarts == 0 and clock.times.began <= time.time()  # this process's start, however long ago
    assert process_start() == pytest.approx(clock.times.began, abs=1.0)


def test_a_refusal_or_an_anomaly_stop_is_what_a_restarted_trainer_repeats(tmp_path):
    from cpt_trainer.events import earlier_ending

    assert earlier_ending(str(tmp_path)) is None
    lines = [{"event": "finished", "reason": "error", "message": "RuntimeError: peer gone"},
             {"event": "finished", "reason": "interrupted", "message": "stopped on request"}]
    (tmp_path / EVENTS).write_text("".join(json.dumps(e) + "\n" for e in lines))
    assert earlier_ending(str(tmp_path)) is None  # a crash or a stop: a restart goes on
    with open(tmp_path / EVENTS, "a") as f:
        f.write(json.dumps({"event": "finished", "reason": "refused", "message": "refused: data: no files"}) + "\n")
    assert earlier_ending(str(tmp_path)) == ("refused", "data: no files")
    with open(tmp_path / EVENTS, "a") as f:
        f.write(json.dumps({"event": "finished", "reason": "anomaly", "message": "non-finite loss"}) + "\n")
    assert earlier_ending(str(tmp_path)) == ("anomaly", "non-finite loss")
