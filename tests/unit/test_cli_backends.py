"""`cptctl status | stop | resume | rollback` go to one backend, chosen in one place
(`cli._backend`): the local run directory of that name, unless a cluster is asked for or there is
no such directory."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from cpt_api.status import CptRunStatus, Phase
from cpt_operator import cli
from cpt_operator.kube.commands import ClusterCommands
from cpt_operator.local.commands import LocalCommands
from cpt_operator.local.rundir import RunDir


def _args(run: str, namespace: str | None = None, kubeconfig: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(run=run, namespace=namespace, kubeconfig=kubeconfig)


@pytest.fixture
def local_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RunDir:
    monkeypatch.chdir(tmp_path)
    rd = RunDir(tmp_path / "runs" / "tiny")
    rd.root.mkdir(parents=True)
    rd.write_status(CptRunStatus(phase=Phase.running, attempt=1))
    return rd


@pytest.mark.parametrize("run, namespace, kubeconfig, backend", [
    ("tiny", None, None, LocalCommands("tiny")),
    ("tiny", "team-a", None, ClusterCommands("tiny", namespace="team-a")),
    ("tiny", None, "/etc/kube", ClusterCommands("tiny", kubeconfig="/etc/kube")),
    ("elsewhere", None, None, ClusterCommands("elsewhere")),
], ids=["a local run directory", "a namespace asks for the cluster", "a kubeconfig asks for the cluster",
        "no local directory: the cluster"])
def test_one_place_chooses_the_backend(local_run: RunDir, run: str, namespace: str | None,
                                       kubeconfig: str | None, backend: object) -> None:
    assert cli._backend(_args(run, namespace, kubeconfig)) == backend


def test_the_local_backend_answers_every_command(local_run: RunDir, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "tiny"]) == 0
    assert "tiny" in capsys.readouterr().out
    assert cli.main(["stop", "tiny"]) == 0
    assert cli.main(["rollback", "tiny", "--to", "base"]) == 0
    assert local_run.take_request("stop") == {"by": "cptctl"}
    assert local_run.take_request("rollback") == {"to": "base"}
    assert cli.main(["resume", "tiny"]) == 2
    assert "`cptctl run FILE` resumes it" in capsys.readouterr().err
