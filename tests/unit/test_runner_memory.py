"""`cptctl run` refuses, before it creates anything, a run whose plan exceeds resources.gpuMemory
or whose host plan exceeds resources.memory."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cpt_operator.local.runner import run_local
from tests.unit.policy.memory_cases import LLAMA3_8B_CONFIG

EXAMPLE = Path(__file__).parents[2] / "examples" / "tiny-local.yaml"


def _run_file(tmp_path: Path, gpu_memory: str | None, config: bool = True, memory: str | None = None) -> str:
    base = tmp_path / "base"
    base.mkdir()
    if config:
        (base / "config.json").write_text(json.dumps(LLAMA3_8B_CONFIG))
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["baseModel"] |= {"uri": str(base), "format": "hf"}
    doc["spec"]["resources"] = {"gpusPerNode": 1, "gpuMemory": gpu_memory, "memory": memory}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_a_run_that_cannot_fit_is_refused_before_launch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "runs" / "tiny"
    assert run_local(_run_file(tmp_path, "24Gi"), run_dir=str(run_dir), progress=False) == 2
    err = capsys.readouterr().err
    assert "not started: per-GPU" in err and "of 24.0 GiB does not fit" in err
    assert not run_dir.exists()


def test_the_nproc_override_is_what_gets_planned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "runs" / "tiny"
    assert run_local(_run_file(tmp_path, "24Gi"), run_dir=str(run_dir), nproc=8, progress=False) == 2
    assert "fsdp over 8 GPUs" in capsys.readouterr().err


def test_a_run_whose_host_memory_cannot_fit_is_refused_before_launch(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "runs" / "tiny"
    assert run_local(_run_file(tmp_path, None, memory="16Gi"), run_dir=str(run_dir), progress=False) == 2
    err = capsys.readouterr().err
    assert "not started: host memory per pod" in err and "of 16.0 GiB does not fit" in err
    assert "largest a rank: staging" in err and "smallest fix: set checkpoint.asynchronous: false" in err
    assert not run_dir.exists()
