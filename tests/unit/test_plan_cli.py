"""`cptctl plan`: the tables by part (GPU, host), and exit codes 0 (fits), 1 (won't fit, fix named),
2 (no plan)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from cpt_operator.cli import main
from tests.unit.policy.memory_cases import LLAMA3_8B_CONFIG


def write_run(tmp_path: Path, parallelism: dict[str, Any], resources: dict[str, Any],
              config: dict[str, Any] | None = LLAMA3_8B_CONFIG) -> str:
    base = tmp_path / "base"
    base.mkdir()
    if config is not None:
        (base / "config.json").write_text(json.dumps(config))
    doc = {"apiVersion": "cpt.mlops.dev/v1alpha1", "kind": "CptRun", "metadata": {"name": "legal-8b"},
           "spec": {"baseModel": {"uri": str(base)},
                    "data": {"sources": [{"name": "legal", "role": "domain", "uri": "s3://d/legal"}]},
                    "budget": {"steps": 1000}, "packing": {"seqLen": 4096},
                    "training": {"microBatchSize": 1, "parallelism": parallelism},
                    "resources": {"gpusPerNode": 8, **resources}}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


DDP, FSDP = {"strategy": "ddp"}, {"strategy": "fsdp"}
CASES = [
    pytest.param(DDP, {"gpuMemory": "80Gi"}, [], 1, "smallest fix: set training.parallelism.strategy: fsdp",
                 id="ddp of an 8B base on 80Gi GPUs does not fit and names fsdp"),
    pytest.param(FSDP, {"gpuMemory": "80Gi"}, [], 0, "fits", id="fsdp of the same run fits"),
    pytest.param(FSDP, {"gpuMemory": "80Gi"}, ["--gpu-memory", "40Gi"], 1, "activationCheckpointing: full",
                 id="a smaller GPU on the command line overrides the spec's"),
    pytest.param(FSDP, {}, [], 0, "total", id="without any GPU memory the plan is printed and accepted"),
    pytest.param(FSDP, {"gpuMemory": "80Gi"}, ["--nodes", "4"], 0, "4 node(s) × 8 GPU(s), fsdp",
                 id="more nodes on the command line are planned"),
    pytest.param(FSDP, {}, ["--gpus-per-node", "0"], 0, "CPU run: fp32",
                 id="a CPU run plans host memory per process in fp32 and says so"),
    pytest.param(FSDP, {"gpuMemory": "80Gi", "memory": "64Gi"}, [], 1,
                 "host memory per pod 112.2 GiB of 64.0 GiB does not fit",
                 id="a pod whose host memory cannot hold its ranks does not fit"),
    pytest.param(FSDP, {"memory": "64Gi"}, [], 1, "smallest fix: set checkpoint.asynchronous: false",
                 id="and the smallest fix of host memory is named"),
    pytest.param(FSDP, {"memory": "64Gi"}, ["--memory", "128Gi"], 0,
                 "(host memory per pod 112.2 GiB of 128.0 GiB: fits)",
                 id="more pod memory on the command line overrides the spec's"),
    pytest.param(FSDP, {}, ["--gpus-per-node", "0", "--memory", "64Gi"], 1, "largest a rank: step",
                 id="a CPU run's step is host memory and counts against the pod's"),
]


@pytest.mark.parametrize("parallelism, resources, flags, code, needle", CASES)
def test_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str], parallelism: dict[str, Any],
              resources: dict[str, Any], flags: list[str], code: int, needle: str) -> None:
    assert main(["plan", write_run(tmp_path, parallelism, resources), *flags]) == code
    out = capsys.readouterr()
    assert needle in out.out + out.err
    for part in ("parameters", "gradients", "optimizer", "activations", "logits", "reference", "buffers",
                 "process", "load", "data_worker", "rank", "pod"):
        assert f"\n  {part} " in out.out


def test_the_host_table_shows_each_moment_and_the_pod(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    offload = {"strategy": "fsdp", "cpuOffload": True}
    assert main(["plan", write_run(tmp_path, offload, {"gpuMemory": "80Gi", "memory": "256Gi"})]) == 0
    host = capsys.readouterr().out.split("host memory per rank")[1].split("scratch disk")[0].splitlines()[1:]
    assert host == [
        "                   loading    training",
        "  process          2.0 GiB     2.0 GiB",
        "  weights          3.7 GiB           -",
        "  load           250.5 MiB           -",
        "  offloaded              -    15.0 GiB",
        "  staging                -    11.2 GiB",
        "  data_worker            -   768.0 MiB",
        "  rank             6.0 GiB    28.9 GiB",
        "  pod            231.9 GiB  = 8 × 28.9 GiB + launcher 512.0 MiB  "
        "(host memory per pod 231.9 GiB of 256.0 GiB: fits)"]


def test_an_unreadable_config_cannot_be_planned_and_says_where(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", write_run(tmp_path, FSDP, {"gpuMemory": "80Gi"}, config=None)]) == 2
    err = capsys.readouterr().err
    assert "cannot plan" in err and f"{tmp_path / 'base' / 'config.json'}" in err


@pytest.mark.parametrize("scratch, uri, code, needle", [
    ("50Gi", "s3://ckpt/legal-8b", 1, "scratch disk per pod 90.7 GiB of 50.0 GiB does not fit (a save's staging "
     "89.7 GiB (8 rank(s)) + work files 1.0 GiB); smallest fix: set resources.scratch: 91Gi"),
    ("100Gi", "s3://ckpt/legal-8b", 0, "90.7 GiB  (scratch disk per pod 90.7 GiB of 100.0 GiB: fits)"),
    ("2Gi", None, 0, "  staging                -  (checkpoints written in place)"),
], ids=["a pod without disk for one save's staging does not fit", "and one with it does",
        "checkpoints on a local path stage nothing"])
def test_the_pods_scratch_disk_holds_one_saves_staging(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        scratch: str, uri: str | None, code: int, needle: str) -> None:
    path = Path(write_run(tmp_path, {"strategy": "fsdp"}, {"scratch": scratch}))
    doc = yaml.safe_load(path.read_text())
    if uri:
        doc["spec"]["checkpoint"] = {"uri": uri}
    path.write_text(yaml.safe_dump(doc))
    assert main(["plan", str(path)]) == code
    out = capsys.readouterr()
    assert needle in out.out + out.err, out.out + out.err
