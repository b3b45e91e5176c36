"""The trainer image on the real node: trainer/Dockerfile built by images.sh (FROM the local Debian
base, torch and its CUDA libraries from PyPI), imported into the node's containerd, run under Pod
Security "restricted" as the operator runs it.

What the image does in a run (the operator's Job, two pods rendezvousing, checkpoints in S3, a
its recoveries) is tests/e2e/test_real_recovery.py; here only what the image promises.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.e2e.real_pods import RESTRICTED, run_pod

pytestmark = [pytest.mark.cluster, pytest.mark.real_node, pytest.mark.timeout(900)]

ENFORCE_RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}


def restrict(kube: Any, namespace: str) -> None:
    kube.kubectl("label", "namespace", namespace, *(f"{k}={v}" for k, v in ENFORCE_RESTRICTED.items()))


def test_the_trainer_image_imports_torch_and_the_trainer_as_its_own_user(
        kube_cluster: Any, real_node: Any, namespace: str, trainer_image: str) -> None:
    """No CUDA base: torch's PyPI wheel brings its CUDA libraries, and imports without a GPU; the
    operator's package is not in the image."""
    restrict(kube_cluster, namespace)
    phase, pod, logs = run_pod(kube_cluster, real_node, namespace, "imports", {
        "image": trainer_image, "securityContext": RESTRICTED,
        "command": ["sh", "-c", "id; python -c 'import torch, transformers, lm_eval, cpt_trainer.launch;"
                    " from importlib.metadata import version;"
                    " print(torch.__version__, transformers.__version__, version(\"lm-eval\"),"
                    " torch.cuda.is_available())';"
                    " python -c 'import cpt_operator' 2>/dev/null && echo operator-present || echo no-operator"],
    }, timeout=240)
    assert phase == "Succeeded", (pod["status"], logs)
    assert "uid=10001(cpt) gid=10001(cpt)" in logs
    assert re.search(r"^2\.15\.0\S* 5\.23\.0 0\.4\.13 False$", logs, re.M), logs
    assert "no-operator" in logs, logs  # the image ships the contract package and the trainer only
