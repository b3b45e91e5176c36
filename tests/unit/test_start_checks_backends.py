"""The start checks exist once (`policy.start_checks`), and both backends refuse, claim and go on
the same way: each case runs through the operator's pass (`reconcile_run` over a CptRun held in
memory) and through `cptctl run`, and both must give the same verdict with the same message.

The base and the checkpoint root are on `gs://`, served by fsspec's in-memory filesystem (the
`memory_object_store` stand-in; the operator reads only object-store bases). The local runner's
"go on" is checked up to its claim of the root (a trainer is not launched here: the local loop
itself is tested in tests/integration/test_local_run.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import fsspec
import pytest
import yaml

from cpt_api.manifest import RUN_RECORD
from cpt_api.status import ConditionType, Reason
from cpt_operator.kube.passes import reconcile_run
from cpt_operator.local import runner
from tests.unit.kube.cases import RUN
from tests.unit.kube.test_memory_check import FakeKube, _body, _condition, _runtime
from tests.unit.policy.memory_cases import LLAMA3_8B_CONFIG


@pytest.fixture(autouse=True)
def object_store(memory_object_store: str) -> str:
    return memory_object_store


def _another_run_owns_the_root(body: dict[str, Any]) -> None:
    root = body["spec"]["checkpoint"]["uri"]
    fsspec.filesystem("gs").pipe(f"{root}/{RUN_RECORD}", json.dumps(
        {"uid": "someone-else", "name": "other", "namespace": "team-b"}).encode())


def _unreadable_base(body: dict[str, Any]) -> None:
    body["spec"]["baseModel"]["uri"] += "-missing"


def _host_memory(body: dict[str, Any]) -> None:
    body["spec"]["resources"]["memory"] = "64Gi"


def _gpu_memory(body: dict[str, Any]) -> None:
    body["spec"]["training"]["parallelism"]["strategy"] = "ddp"


CASES: list[tuple[str, Callable[[dict[str, Any]], None], Reason | None, str]] = [
    ("a run that fits starts", lambda body: None, None, ""),
    ("per-GPU memory too small: refused with the fix", _gpu_memory, Reason.wont_fit,
     "smallest fix: set training.parallelism.strategy: fsdp"),
    ("host memory too small: refused with the fix", _host_memory, Reason.wont_fit,
     "smallest fix: set checkpoint.asynchronous: false"),
    ("an unreadable base does not block the run", _unreadable_base, None, ""),
    ("another run's checkpoint root: refused", _another_run_owns_the_root, Reason.checkpoint_uri_in_use,
     "is taken: it belongs to another run"),
]


def _operator(body: dict[str, Any]) -> tuple[Reason | None, str]:
    kube, events = FakeKube(body), []
    started = reconcile_run(_runtime(kube, events), RUN.namespace, RUN.name) is not None
    if started:
        assert len(kube.jobs()) == 1
        return None, ""
    assert kube.jobs() == []
    valid = _condition(kube.body, ConditionType.spec_valid)
    assert valid["status"] == "False"
    return Reason(valid["reason"]), valid["message"]


def _local(body: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str],
           monkeypatch: pytest.MonkeyPatch) -> tuple[Reason | None, str]:
    """`cptctl run` on the same spec, stopped where its loop would begin."""
    doc = {"apiVersion": "cpt.mlops.dev/v1alpha1", "kind": "CptRun",
           "metadata": {"name": body["metadata"]["name"]}, "spec": body["spec"]}
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump(doc))

    class Began(Exception):
        pass

    def loop(self: runner.LocalRun, resume: bool) -> None:
        raise Began()

    monkeypatch.setattr(runner.LocalRun, "loop", loop)
    try:
        code = runner.run_local(str(file), run_dir=str(tmp_path / "local-run"), progress=False)
    except Began:
        return None, ""
    err = capsys.readouterr().err
    assert code == 2, err
    said = err.split("not started: ", 1)[-1].split("error: ", 1)[-1].strip()
    reason = Reason.checkpoint_uri_in_use if said.startswith("checkpoint.uri") else Reason.wont_fit
    return reason, said


@pytest.mark.parametrize("change, reason, says", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_operator_and_the_local_runner_decide_a_start_alike(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        change: Callable[[dict[str, Any]], None], reason: Reason | None, says: str) -> None:
    def case() -> dict[str, Any]:
        body = _body(tmp_path, LLAMA3_8B_CONFIG, memory="900Gi", strategy="fsdp")
        change(body)
        return body

    on_cluster = _operator(case())
    root = case()["spec"]["checkpoint"]["uri"]
    if fsspec.filesystem("gs").exists(root):  # the operator's claim goes: the local run claims anew
        fsspec.filesystem("gs").rm(root, recursive=True)
    locally = _local(case(), tmp_path, capsys, monkeypatch)
    assert on_cluster[0] == locally[0] == reason
    assert says in on_cluster[1]
    # the same words: the local runner adds only where its run directory is
    assert locally[1].startswith(on_cluster[1]), (on_cluster, locally)
