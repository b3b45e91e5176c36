"""`cptctl run` end to end on a tiny model: progress, run directory, Ctrl-C and resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.harness import processes_of, tiny_spec, wait_for

pytestmark = pytest.mark.slow


def write_run(tmp: Path, spec: dict, name: str = "tiny") -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "cpt.mlops.dev/v1alpha1", "kind": "CptRun",
                                    "metadata": {"name": name}, "spec": spec}))
    return path


def cptctl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cpt_operator.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def test_ctrl_c_stops_after_a_checkpoint_and_the_same_command_resumes(tmp_path, tiny_model_dir, corpora):
    spec = tiny_spec(tiny_model_dir, corpora, budget={"steps": 400},
                     checkpoint={"every": 4, "keep": 2})
    spec["packing"] = {"seqLen": 128, "boundary": "documentMask"}
    file = write_run(tmp_path, spec)
    run_dir = tmp_path / "runs" / "tiny"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Ctrl-C as a terminal sends it. A test session started in the background (`cmd &` in a
    # script) ignores SIGINT, and so would cptctl, which inherits that: give it the default back.
    proc = subprocess.Popen([sys.executable, "-m", "cpt_operator.cli", "run", str(file), "--nproc", "1",
                             "--no-progress"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpts = run_dir / "checkpoints" / "attempt-001"
    wait_for(lambda: any((p / "manifest.json").exists() for p in ckpts.glob("step-*")), 240,
             "a first checkpoint")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 130, out
    assert "Resume with: cptctl run" in out
    stopped = status(run_dir)
    assert stopped["phase"] == "Stopped"
    stopped_at = stopped["step"]
    events = [json.loads(line) for line in (run_dir / "attempt-001" / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "finished" and events[-1]["reason"] == "interrupted", events[-1]
    # The interrupted attempt ended with a checkpoint at the step it stopped at.
    last = max(ckpts.glob("step-*"))
    manifest = json.loads((last / "manifest.json").read_text())
    assert manifest["step"] == events[-1]["step"]

    # Resume: shrink the budget so the rest is quick; the base model is unchanged, so the run
    # directory is accepted as the same run.
    spec["budget"] = {"steps": manifest["step"] + 6}
    write_run(tmp_path, spec)
    done = cptctl("run", str(file), "--nproc", "1", "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    final = status(run_dir)
    assert final["phase"] == "Succeeded" and final["attempt"] == 2
    assert final["step"] == manifest["step"] + 6 and final["step"] > stopped_at - 1
    config = json.loads((run_dir / "attempt-002" / "trainer-config.json").read_text())
    assert config["restoreFrom"].endswith(f"attempt-001/{last.name}")
    assert config["restoreMode"] == "fullState"
    shown = cptctl("status", str(run_dir), cwd=tmp_path)
    assert shown.returncode == 0 and "Succeeded" in shown.stdout


def test_a_failing_trainer_makes_cptctl_exit_non_zero_with_the_reason(tmp_path, tiny_model_dir, corpora):
    spec = tiny_spec(tiny_model_dir, corpora, budget={"steps": 3})
    spec["data"]["sources"][0]["uri"] = str(tmp_path / "missing" / "*.txt")
    done = cptctl("run", str(write_run(tmp_path, spec, "broken")), "--nproc", "1", "--no-progress",
                  cwd=tmp_path)
    assert done.returncode != 0
    text = done.stdout + done.stderr
    assert "Failed" in text and "legal" in text, text
    # A refused configuration is not retried: the same attempt would fail the same way.
    assert "restart" not in text and "attempt 1" in text, text


def test_invalid_spec_is_reported_with_field_paths(tmp_path, tiny_model_dir, corpora):
    spec = tiny_spec(tiny_model_dir, corpora)
    spec["packing"] = {"seqLen": 8, "boundary": "sideways"}
    done = cptctl("run", str(write_run(tmp_path, spec, "bad")), cwd=tmp_path)
    assert done.returncode == 2
    assert "packing.seqLen" in done.stderr and "packing.boundary" in done.stderr
    assert "documentMask" in done.stderr  # what would be valid


def test_a_killed_runner_takes_its_trainers_along_and_a_stray_is_ended_by_the_next_run(
        tmp_path, tiny_model_dir, corpora):
    spec = tiny_spec(tiny_model_dir, corpora, budget={"steps": 400}, checkpoint={"every": 4, "keep": 2})
    file = write_run(tmp_path, spec)
    run_dir = tmp_path / "runs" / "tiny"
    config = run_dir / "attempt-001" / "trainer-config.json"
    runner = subprocess.Popen([sys.executable, "-m", "cpt_operator.cli", "run", str(file), "--nproc", "2",
                               "--no-progress"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    events = run_dir / "attempt-001" / "events.jsonl"
    wait_for(lambda: events.exists() and '"progress"' in events.read_text(), 240, "the 2-rank trainer training")
    trainers = processes_of(config)
    assert len(trainers) >= 3, trainers  # torchrun and its two workers
    # a hung run: one rank stopped, the other waiting for it in a collective
    worker = max(trainers)
    os.kill(worker, signal.SIGSTOP)
    runner.kill()  # SIGKILL, as the OOM killer sends it: no chance to stop anything itself
    runner.wait()
    # the kernel tells torchrun its runner died; torchrun ends its workers, the hung one too
    wait_for(lambda: not processes_of(config), 120, "the trainers to end with their runner")

    # A trainer the runner could not take along (started here by hand, in its own session, as
    # a runner without that kernel feature would leave it): the next `cptctl run` ends it first.
    stray = subprocess.Popen([sys.executable, "-m", "cpt_trainer", "--config", str(config)], cwd=tmp_path,
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: bool(processes_of(config)), 30, "the stray trainer")
    spec["budget"] = {"steps": 6}
    write_run(tmp_path, spec)
    done = cptctl("run", str(file), "--nproc", "1", "--no-progress", cwd=tmp_path)
    assert "ending a trainer the previous runner left running" in done.stderr, done.stdout + done.stderr
    assert stray.wait(timeout=5) is not None and not processes_of(config)
    assert done.returncode == 0 and status(run_dir)["phase"] == "Succeeded", done.stdout + done.stderr

