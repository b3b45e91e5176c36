"""Separate evaluations on a cluster (`evaluation.placement: separate`): one Job per checkpoint.

Each is a one-pod Job (`<run>-e<attempt>-<step>`, `<run>-ebase` for the base) with its own
ConfigMap, owned by the CptRun (deleting the run deletes them), labelled with the run and the
target but with no attempt label, so it is never taken for an attempt's pod or a stray. The pod
is a trainer pod's size on the run's pool (image, Secret, node selector and tolerations of the
run, so the tenancy allow-lists hold for it too): it loads the checkpoint sharded over its
`resources.procsPerNode` ranks, writes the evaluation record and exits. With `resources.queue`
it queues in Kueue like an attempt. The Job retries its pod `EVALUATION_TRIES - 1` times; a Job
that failed is reported (the core names it), one that completed is deleted once its record is
written, so a long run does not pile up finished Jobs.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from cpt_api.evaluation import EVALUATION_TRIES
from cpt_api.kueue import LABEL_PRIORITY, LABEL_QUEUE
from cpt_api.manifest import attempt_folder, attempt_of, checkpoint_name, step_of
from cpt_api.spec import CptRunSpec
from cpt_api.status import BASE
from cpt_api.trainer_config import TrainerConfig
from ..policy.evaluations import EvalRun
from ..reconcile import Evaluate, evaluation_config, evaluation_target
from .builders import (CONFIG_DIR, CONFIG_FILE, LABEL_EVALUATION, LABEL_RUN, MAX_JOB_NAME, WORK_DIR, Object, RunRef,
                       checkpoint_root, config_map, dns_label_stem, owner_reference, run_label, shorten)
from .settings import Settings

def target_label(target: str) -> str:
    if target == BASE:
        return BASE
    return f"a{attempt_of(target)}-s{step_of(target)}"


def target_of(obj: Mapping[str, Any]) -> str | None:
    """The target an evaluation's object or pod is labelled with (None: not an evaluation's)."""
    label = (obj.get("metadata", {}).get("labels") or {}).get(LABEL_EVALUATION, "")
    if label == BASE:
        return BASE
    found = re.fullmatch(r"a(\d+)-s(\d+)", label)
    return f"{attempt_folder(int(found[1]))}/{checkpoint_name(int(found[2]))}" if found else None


def evaluation_name(run: str, target: str) -> str:
    suffix = "-ebase" if target == BASE else f"-e{attempt_of(target)}-{step_of(target)}"
    return shorten(dns_label_stem(run), MAX_JOB_NAME - len(suffix)) + suffix


def _metadata(run: RunRef, target: str) -> Object:
    return {"name": evaluation_name(run.name, target), "namespace": run.namespace,
            "labels": {"app.kubernetes.io/name": "cpt-evaluation", "app.kubernetes.io/managed-by": "cpt-operator",
                       LABEL_RUN: run_label(run.name), LABEL_EVALUATION: target_label(target)},
            "ownerReferences": [owner_reference(run)]}


def config(run: RunRef, spec: CptRunSpec, action: Evaluate, settings: Settings) -> TrainerConfig:
    return evaluation_config(action, spec=spec, run=run.name, namespace=run.namespace, run_uid=run.uid,
                             checkpoint_root=checkpoint_root(spec), run_dir=f"{WORK_DIR}/evaluate",
                             image=spec.resources.image or settings.trainer_image)


def command(spec: CptRunSpec, action: Evaluate) -> list[str]:
    """The evaluator on every GPU of the pod: torchrun on one node, or one process."""
    evaluate = ["--config", f"{CONFIG_DIR}/{CONFIG_FILE}", "--evaluate", evaluation_target(action)]
    procs = spec.resources.procs_per_node
    if procs == 1:
        return ["python", "-m", "cpt_trainer", *evaluate]
    return ["python", "-m", "cpt_trainer.launch", "--standalone", f"--nproc-per-node={procs}",
            "-m", "cpt_trainer", *evaluate]


def build(run: RunRef, spec: CptRunSpec, action: Evaluate, settings: Settings) -> list[Object]:
    """The evaluation's ConfigMap and Job, in creation order."""
    from .launcher import pod_spec  # a trainer pod's spec: same image, volumes, limits and pool

    name = evaluation_name(run.name, action.target)
    cm = config_map(run, action.attempt, config(run, spec, action, settings))
    cm["metadata"] = _metadata(run, action.target)
    pod = pod_spec(spec, name, settings)
    pod.pop("subdomain", None)  # no rendezvous between pods: one pod
    container = pod["containers"][0]
    container["command"] = command(spec, action)
    container.pop("args", None)
    container["ports"] = []
    meta = _metadata(run, action.target)
    if spec.resources.queue:
        meta["labels"][LABEL_QUEUE] = spec.resources.queue
        if spec.resources.priority_class:
            meta["labels"][LABEL_PRIORITY] = spec.resources.priority_class
    pod_labels = {k: v for k, v in meta["labels"].items() if k not in (LABEL_QUEUE, LABEL_PRIORITY)}
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": {
        "completions": 1, "parallelism": 1, "backoffLimit": EVALUATION_TRIES - 1,
        **({"suspend": True} if spec.resources.queue else {}),
        "template": {"metadata": {"labels": pod_labels}, "spec": pod}}}
    return [cm, job]


def runs(jobs: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]]
         ) -> tuple[dict[str, EvalRun], dict[str, str]]:
    """What a run's evaluation Jobs say: running or failed ones by target, and the Jobs that
    completed (their records are written), by target."""
    from .launcher import failure_message

    found: dict[str, EvalRun] = {}
    completed: dict[str, str] = {}
    for job in jobs:
        target = target_of(job)
        if target is None:
            continue
        conditions = {c.get("type"): c.get("status") for c in job.get("status", {}).get("conditions", []) or []}
        if job["metadata"].get("deletionTimestamp"):
            found[target] = EvalRun(state="running")  # on its way out: not started again meanwhile
        elif conditions.get("Complete") == "True" or conditions.get("SuccessCriteriaMet") == "True":
            completed[target] = job["metadata"]["name"]
        elif conditions.get("Failed") == "True" or conditions.get("FailureTarget") == "True":
            mine = [p for p in pods if target_of(p) == target]
            found[target] = EvalRun(state="failed", message=f"Job {job['metadata']['name']}: "
                                                            f"{failure_message(job, mine)}")
        else:
            found[target] = EvalRun(state="running")
    return found, completed


__all__ = ["LABEL_EVALUATION", "build", "evaluation_name", "runs", "target_label"]
