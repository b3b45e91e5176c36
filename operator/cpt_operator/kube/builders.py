"""Pure builders: (CptRun, attempt, settings) in, Kubernetes objects (plain dicts) out.

Nothing here talks to a cluster, so every object the operator creates can be checked by a unit
test. Names are deterministic: a second reconcile pass, or a restarted operator, builds the same
names and finds what the first one created instead of creating it twice.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from cpt_api.spec import API_VERSION, KIND, CptRunSpec
from cpt_api.storage import OBJECT_STORE_SCHEMES, is_object_store
from cpt_api.trainer_config import TrainerConfig
from cpt_api.manifest import CONFIG, attempt_folder
from ..reconcile import StartAttempt, attempt_config
from .settings import Settings

CONFIG_DIR = "/etc/cpt"
CONFIG_FILE = CONFIG
WORK_DIR = "/var/run/cpt"
LABEL_RUN = "cpt.mlops.dev/run"
LABEL_ATTEMPT = "cpt.mlops.dev/attempt"
LABEL_EVALUATION = "cpt.mlops.dev/evaluation"
"""On a separate evaluation's objects and pods (`kube/evaluations.py`), instead of an attempt
label: its target, `base` or `a<attempt>-s<step>`."""
MAX_JOB_NAME = 56
"""An Indexed Job's pod hostname is `<job>-<index>` and must fit a 63-character DNS label;
56 leaves room for indices up to 9999 (resources.nodes is at most 1024)."""

MAX_CONFIG_MAP_BYTES = 1024 * 1024
"""The API server refuses a ConfigMap whose keys and values add up to more than 1 MiB."""

Object = dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class RunRef:
    """The CptRun that owns an attempt's objects."""

    name: str
    namespace: str
    uid: str


class SpecProblem(ValueError):
    """The spec is valid on its own but cannot run on a cluster."""


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:6]


def shorten(name: str, limit: int) -> str:
    if len(name) <= limit:
        return name
    return f"{name[:limit - 7].rstrip('-')}-{_digest(name)}"


def dns_label_stem(run: str) -> str:
    """A DNS-1035 label stem for `run`: lowercase alphanumerics and '-', starting with a letter.

    A CptRun name is a DNS subdomain (it may hold dots, or start with a digit), a Service name is
    not. A name that had to change carries a digest of the original, so two runs never share
    one: `my.run` and `my-run`, or `1foo` and `r1foo`, get different stems."""
    stem = re.sub(r"[^a-z0-9-]", "-", run.lower())
    if not stem[:1].isalpha():
        stem = f"r{stem}"
    if stem == run:
        return run
    return f"{stem.rstrip('-')}-{_digest(run)}"


def attempt_name(run: str, attempt: int) -> str:
    """`<run>-a<attempt>`: the name of every object of the attempt (ConfigMap, Service, Job);
    a valid DNS-1035 label, shortened with a digest when long."""
    suffix = f"-a{attempt}"
    return shorten(dns_label_stem(run), MAX_JOB_NAME - len(suffix)) + suffix


def run_label(run: str) -> str:
    return shorten(run, 63)


def labels(run: RunRef, attempt: int) -> dict[str, str]:
    return {"app.kubernetes.io/name": "cpt-trainer", "app.kubernetes.io/managed-by": "cpt-operator",
            LABEL_RUN: run_label(run.name), LABEL_ATTEMPT: str(attempt)}


def selector(run: RunRef, attempt: int) -> str:
    return f"{LABEL_RUN}={run_label(run.name)},{LABEL_ATTEMPT}={attempt}"


def owner_reference(run: RunRef) -> Object:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": run.name, "uid": run.uid,
            "controller": True, "blockOwnerDeletion": True}


def metadata(run: RunRef, attempt: int, name: str | None = None) -> Object:
    return {"name": name or attempt_name(run.name, attempt), "namespace": run.namespace,
            "labels": labels(run, attempt), "ownerReferences": [owner_reference(run)]}


def checkpoint_root(spec: CptRunSpec) -> str:
    if not spec.checkpoint.uri:
        raise SpecProblem("checkpoint.uri is required on a cluster: pods share no run directory, "
                          "so checkpoints must go to object storage (e.g. s3://bucket/runs/NAME)")
    if not is_object_store(spec.checkpoint.uri):
        # a path would name the operator's own filesystem, not one the pods share
        raise SpecProblem(f"checkpoint.uri {spec.checkpoint.uri!r} is not object storage: on a cluster "
                          f"checkpoints go to one of {', '.join(s + '://' for s in OBJECT_STORE_SCHEMES)}")
    return spec.checkpoint.uri.rstrip("/")


def trainer_config(run: RunRef, spec: CptRunSpec, action: StartAttempt, settings: Settings) -> TrainerConfig:
    """What the attempt's trainer runs with: the pod's work dir, the spec's checkpoint root."""
    return attempt_config(action, spec=spec, run=run.name, namespace=run.namespace, run_uid=run.uid,
                          checkpoint_root=checkpoint_root(spec),
                          run_dir=f"{WORK_DIR}/{attempt_folder(action.number)}",
                          metrics_port=settings.trainer_metrics_port,
                          image=spec.resources.image or settings.trainer_image)


def config_map(run: RunRef, attempt: int, config: TrainerConfig) -> Object:
    """The trainer's config file; refused here rather than by the API server when too big, so the
    message can say what to do."""
    text = config.dump_json()
    size = len(CONFIG_FILE) + len(text.encode())
    if size > MAX_CONFIG_MAP_BYTES:
        raise SpecProblem(f"the trainer config of attempt {attempt} is {size:,} bytes; a ConfigMap holds at most "
                          f"{MAX_CONFIG_MAP_BYTES:,} (a long tokenizer.extend.terms list is the usual cause: "
                          "let tokenizer.extend.topK find the terms instead)")
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(run, attempt),
            "data": {CONFIG_FILE: text}}


def headless_service(run: RunRef, attempt: int, settings: Settings) -> Object:
    """Gives each pod a stable DNS name (`<job>-<index>.<service>`) for the c10d rendezvous.
    Addresses are published before readiness: rendezvous happens before anything is ready."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata(run, attempt),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {LABEL_RUN: run_label(run.name), LABEL_ATTEMPT: str(attempt)},
                     "ports": [{"name": "c10d", "port": settings.rdzv_port,
                                "targetPort": settings.rdzv_port, "protocol": "TCP"}]}}
