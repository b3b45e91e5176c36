"""Recovery without a new attempt, through `cptctl run` on 2 ranks: torchrun restarts a killed
worker in place (stopPolicy.maxInPlaceRestarts) and the ranks continue from the attempt's newest
checkpoint; a failure past that limit ends the attempt and a new one takes over. The run's
goodput accounts for its wall time."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.harness import processes_of, tiny_spec, wait_for
from tests.integration.test_local_run import status, write_run

pytestmark = pytest.mark.slow


def ranks_of(config: Path) -> list[int]:
    """The trainer's rank processes: torchrun's children (not their data workers)."""
    pids = processes_of(config)
    parents = {pid: _parent(pid) for pid in pids}
    agents = {pid for pid in pids if b"cpt_trainer.launch" in _cmdline(pid)}
    return sorted(pid for pid, parent in parents.items() if parent in agents)


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # the line a killed rank was writing
    return out


def progressed(path: Path, starts: int) -> bool:
    """The attempt's trainer started `starts` times and trained and saved since the last start."""
    evs = events(path)
    begun = [i for i, e in enumerate(evs) if e["event"] == "started"]
    if len(begun) < starts:
        return False
    after = evs[begun[starts - 1]:]
    return any(e["event"] == "checkpoint" for e in after) and any(e["event"] == "progress" for e in after)


def start_run(tmp_path: Path, spec: dict, name: str) -> tuple[subprocess.Popen[str], Path]:
    """`cptctl run` of `spec` on 2 ranks in the background, and its run directory."""
    file = write_run(tmp_path, spec, name)
    runner = subprocess.Popen([sys.executable, "-m", "cpt_operator.cli", "run", str(file), "--nproc", "2",
                               "--no-progress"], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    return runner, tmp_path / "runs" / name


def test_killed_workers_restart_in_place_then_a_new_attempt_takes_over(tmp_path, tiny_model_dir, corpora):
    spec = tiny_spec(tiny_model_dir, corpora, budget={"steps": 60}, checkpoint={"every": 3, "keep": 3})
    spec["stopPolicy"] = {"maxInPlaceRestarts": 2, "maxAttemptRestarts": 1}
    spec["training"] = {**spec["training"], "logEvery": 1}
    runner, run_dir = start_run(tmp_path, spec, "restarts")
    config = run_dir / "attempt-001" / "trainer-config.json"
    log = run_dir / "attempt-001" / "events.jsonl"
    try:
        for kill in range(3):  # two in place, the third past the limit
            wait_for(lambda k=kill: progressed(log, k + 1), 120, f"training after start {kill + 1}")
            ranks = ranks_of(config)
            assert len(ranks) == 2, ranks
            os.kill(ranks[kill % 2], signal.SIGKILL)  # rank 0 or 1: either must be recovered
            if kill < 2:
                wait_for(lambda k=kill: len([e for e in events(log) if e["event"] == "started"]) == k + 2, 120,
                         f"in-place restart {kill + 1}")
                assert status(run_dir)["attempt"] == 1
        out, _ = runner.communicate(timeout=300)
    finally:
        runner.kill()
    assert runner.returncode == 0, out
    assert out.count("torchrun restarted the ranks in place") == 2, out

    evs = events(log)
    starts = [e for e in evs if e["event"] == "started"]
    saved = [e["step"] for e in evs if e["event"] == "checkpoint"]
    assert [s["restart"] for s in starts] == [0, 1, 2]
    for before, start in zip(starts, starts[1:]):
        # each restart continued from the newest checkpoint committed before it
        newest = max(s for s in saved if evs.index(start) > next(
            i for i, e in enumerate(evs) if e["event"] == "checkpoint" and e["step"] == s))
        assert start["step"] == newest > before["step"], (start, newest)
        assert start["restoreFrom"].endswith(f"attempt-001/step-{newest:08d}")
    final = status(run_dir)
    assert final["phase"] == "Succeeded" and final["step"] == 60
    assert final["attempt"] == 2 and final["restarts"] == 1, final
    assert final["inPlaceRestarts"] == 2
    second = json.loads((run_dir / "attempt-002" / "trainer-config.json").read_text())
    assert second["restoreFrom"].startswith("attempt-001/step-") or "attempt-001/step-" in second["restoreFrom"]

    goodput = final["goodput"]
    seconds = goodput["seconds"]
    wall = goodput["until"] - goodput["since"]
    total = sum(seconds.values())
    assert abs(total - wall) <= 0.03 * wall + 2, (total, wall, seconds)
    assert seconds["other"] <= 0.1 * wall, seconds  # what no measurement explains
    for cause in ("productive", "restoring", "checkpointing", "lostSteps", "failures", "starting"):
        assert seconds[cause] > 0, (cause, seconds)
    assert goodput["share"] == pytest.approx(seconds["productive"] / total, rel=1e-3)
    shown = subprocess.run([sys.executable, "-m", "cpt_operator.cli", "status", str(run_dir)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "in place: 2" in shown.stdout and "goodput:" in shown.stdout, shown.stdout


def test_a_refused_config_is_refused_again_at_once_by_the_restarted_trainers(tmp_path, tiny_model_dir, corpora):
    spec = tiny_spec(tiny_model_dir, corpora, budget={"steps": 6})
    spec["data"]["sources"][0]["uri"] = str(tmp_path / "missing" / "*.txt")
    spec["stopPolicy"] = {"maxInPlaceRestarts": 2}
    file = write_run(tmp_path, spec, "refused")
    done = subprocess.run([sys.executable, "-m", "cpt_operator.cli", "run", str(file), "--nproc", "2",
                           "--no-progress"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    run_dir = tmp_path / "runs" / "refused"
    final = status(run_dir)
    assert final["phase"] == "Failed" and final["restarts"] == 0 and final["attempt"] == 1, final
    refusals = [e for e in events(run_dir / "attempt-001" / "events.jsonl") if e.get("reason") == "refused"]
    # torchrun restarts a worker whatever it exited with; the restarts refuse before loading anything
    assert len(refusals) == 3 and len({e["message"] for e in refusals}) == 1, refusals  # the same reason
    assert "legal" in refusals[0]["message"]
    trainer_log = (run_dir / "attempt-001" / "trainer.log").read_text()
    assert trainer_log.count("rank0 WARNING cpt_trainer.loop: ending as the trainer before this in-place restart") == 2


def test_a_stop_signal_to_one_rank_saves_and_the_ranks_go_on_in_place(tmp_path, tiny_model_dir, corpora):
    """What a deleted pod does to the others: its rank is signalled, every rank saves, and the
    ranks that were not signalled exit EXIT_PEER_STOPPED, so torchrun restarts them in place
    from that checkpoint instead of completing."""
    spec = tiny_spec(tiny_model_dir, corpora, budget={"steps": 40}, checkpoint={"every": 10, "keep": 3})
    spec["training"] = {**spec["training"], "logEvery": 1}
    runner, run_dir = start_run(tmp_path, spec, "peer")
    config = run_dir / "attempt-001" / "trainer-config.json"
    log = run_dir / "attempt-001" / "events.jsonl"
    try:
        wait_for(lambda: any(e["event"] == "progress" and e["step"] >= 3 for e in events(log)), 120, "training")
        ranks = ranks_of(config)
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], signal.SIGTERM)  # rank 1 only, as a deleted pod's trainer gets it
        out, _ = runner.communicate(timeout=300)
    finally:
        runner.kill()
    assert runner.returncode == 0, out
    evs = events(log)
    stopped = next(e for e in evs if e["event"] == "finished" and e["reason"] == "interrupted")
    starts = [e for e in evs if e["event"] == "started"]
    assert len(starts) == 2 and starts[1]["step"] == stopped["step"], (starts, stopped)  # nothing replayed
    assert starts[1]["restoreFrom"].endswith(f"attempt-001/step-{stopped['step']:08d}")
    final = status(run_dir)
    assert final["phase"] == "Succeeded" and final["step"] == 40 and final["attempt"] == 1, final
    assert final["inPlaceRestarts"] == 1 and final["restarts"] == 0
    assert final["goodput"]["seconds"]["lostSteps"] == 0, final["goodput"]  # the stop saved every step
