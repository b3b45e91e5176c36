"""Helpers to run the real trainer the way the control plane does: a TrainerConfig file and
`torchrun ... -m cpt_trainer --config F` (gloo on CPU)."""
from __future__ import annotations

import atexit
import json
import shutil
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

from cpt_api import TrainerConfig
from cpt_api.events import parse_event


def odd_length(text: str) -> bool:
    """A refusal classifier (`tests.integration.harness:odd_length`) whose verdicts differ from
    output to output even on a random model, which never writes a refusal phrase."""
    return len(text) % 2 == 1


def with_repo_path(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with the repository root first on PYTHONPATH: a process
    started elsewhere than the repository (a script, `cptctl run` in a temp dir) imports `tests`
    modules then (a refusal classifier named as `tests.integration.harness:odd_length`)."""
    env = dict(os.environ if env is None else env)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def tiny_spec(model: Path, corpora: dict[str, Path], **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "baseModel": {"uri": str(model), "format": "hf"},
        "data": {"sources": [
            {"name": "legal", "role": "domain", "uri": f"{corpora['domain']}/*.txt", "weight": 0.7},
            {"name": "code", "role": "replay", "uri": f"{corpora['replay']}/*.jsonl",
             "format": "jsonl", "weight": 0.3},
        ]},
        "packing": {"seqLen": 64, "boundary": "documentMask"},
        "optimizer": {"lr": 3e-3},
        "schedule": {"warmupSteps": 2, "decay": "cosine", "minLr": 3e-4},
        "budget": {"steps": 8},
        "training": {"microBatchSize": 2, "gradAccumulation": 2},
        "checkpoint": {"every": 3, "keep": 10},
    }
    for key, value in overrides.items():
        spec[key] = value
    return spec


def write_config(tmp: Path, spec: dict[str, Any], *, attempt: int = 1, name: str = "t",
                 restore_from: str | None = None, restore_mode: str | None = None,
                 checkpoints: Path | None = None, overrides: dict[str, float] | None = None,
                 base_sha256: str | None = None, root: Path | None = None,
                 run_uid: str | None = None) -> Path:
    run_dir = tmp / f"attempt-{attempt}"
    run_dir.mkdir(parents=True, exist_ok=True)
    doc = {"run": name, "attempt": attempt, "spec": spec, "runDir": str(run_dir),
           "checkpointUri": str(checkpoints or tmp / "checkpoints" / f"attempt-{attempt:03d}")}
    if restore_from:
        doc["restoreFrom"] = restore_from
    if restore_mode:
        doc["restoreMode"] = restore_mode
    if overrides:
        doc["overrides"] = overrides
    if base_sha256:
        doc["baseSha256"] = base_sha256
    if root is not None:  # as the control plane runs it: a claimed root with pins
        doc["checkpointRoot"], doc["runUid"] = str(root), run_uid
    cfg = TrainerConfig.model_validate(doc)
    path = run_dir / "trainer-config.json"
    path.write_text(cfg.dump_json())
    return path


def trainer_command(config: Path, nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "cpt_trainer", "--config", str(config)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "cpt_trainer", "--config", str(config)]


def start(config: Path, nproc: int = 1) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(config.parent / "trainer.log", "ab")
    return subprocess.Popen(trainer_command(config, nproc), stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


def run(config: Path, nproc: int = 1, timeout: float = 300) -> int:
    proc = start(config, nproc)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def check_checkpoint_on(world: int, checkpoint: Path, out: Path) -> dict[str, Any]:
    """Load `checkpoint` into an fsdp model and optimizer on `world` processes and compare every
    tensor with the files (`reshard_check.py`); returns its report."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    check = Path(__file__).with_name("reshard_check.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={world}", str(check), str(checkpoint), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def events(config: Path) -> list[Any]:
    path = config.parent / "events.jsonl"
    if not path.exists():
        return []
    return [parse_event(line) for line in path.read_text().splitlines() if line.strip()]


def of(kind: str, evs: list[Any]) -> list[Any]:
    return [e for e in evs if e.event == kind]


def log_tail(config: Path) -> str:
    path = config.parent / "trainer.log"
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def wait_for(predicate: Any, timeout: float, what: str, poll: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def processes_of(config: Path) -> set[int]:
    """Live processes of the trainer started on `config` (its path is on their command line)."""
    needle = str(config).encode()
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
            except OSError:  # exited meanwhile
                pass
    return pids


def kill_after_checkpoint(config: Path, nproc: int, checkpoints: Path, step: int,
                          timeout: float = 300) -> Path:
    """Start the trainer, SIGKILL its process group as soon as checkpoint `step` is committed,
    and check that no process of it lives on (torchrun's workers are in sessions of their own:
    they must die with it) and that the run had not ended by itself. Returns the checkpoint."""
    from cpt_api.manifest import checkpoint_name

    target = checkpoints / checkpoint_name(step)
    proc = start(config, nproc=nproc)
    wait_for(lambda: (target / "manifest.json").exists(), timeout, f"the step-{step} checkpoint",
             poll=0.01)
    assert len(processes_of(config)) > nproc  # the workers (and their data workers) are seen
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for(lambda: not processes_of(config), 5, "every process of the killed trainer to exit")
    assert not of("finished", events(config)), "the run ended before the kill; it needs more steps"
    return target


def manifest_of(path: Path) -> dict[str, Any]:
    return json.loads((path / "manifest.json").read_text())


def optimizer_steps(checkpoint: Path) -> dict[str, float]:
    """AdamW's step count per parameter, read from a checkpoint's sharded optimizer state."""
    import torch
    import torch.distributed.checkpoint as dcp

    directory = checkpoint / "optimizer"
    keys = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    steps = {k: torch.zeros(()) for k in keys if k.endswith(".step")}
    dcp.load(steps, checkpoint_id=directory, no_dist=True)
    return {k: float(v) for k, v in steps.items()}


def python_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.glob("*.py") if 2_000 < p.stat().st_size < 40_000)


_PRETRAINED: dict[tuple[str, int], Path] = {}
"""Bases pretrained in this test process, by (model, steps): the training is deterministic, so a
second test that asks for the same base gets a copy instead of training it again."""


def pretrain_on_code(model_dir: Path, out: Path, steps: int = 60) -> Path:
    """Give the random model a general ability worth protecting: next-token skill on Python."""
    done = _PRETRAINED.get((str(model_dir), steps))
    if done is not None and done.exists():
        shutil.copytree(done, out)
        return out
    _train_on_code(model_dir, out, steps)
    kept = Path(tempfile.mkdtemp(prefix="pretrained-")) / "base"  # a copy no test writes into
    shutil.copytree(out, kept)
    atexit.register(shutil.rmtree, kept.parent, True)
    _PRETRAINED[(str(model_dir), steps)] = kept
    return out


def _train_on_code(model_dir: Path, out: Path, steps: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok("\n".join(p.read_text() for p in python_files()[:40]))["input_ids"]
    data = torch.tensor(ids[: (len(ids) // 64) * 64]).view(-1, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = data[torch.randint(len(data), (16,), generator=gen)]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)


def jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def forgetting_files(tmp: Path, domain_texts: list[Path]) -> dict[str, Path]:
    """The files of the forgetting scenario: Python to replay (`code_train`), held-out Python
    (`code_eval`, the general ability a gate protects) and legal passages (`legal_eval`)."""
    files = python_files()
    return {
        "code_train": jsonl(tmp / "code-train.jsonl", [p.read_text() for p in files[:40]]),
        "code_eval": jsonl(tmp / "code-eval.jsonl", [p.read_text()[:1500] for p in files[40:48]]),
        "legal_eval": jsonl(tmp / "legal-eval.jsonl", [p.read_text()[:1500] for p in domain_texts[:4]]),
    }
