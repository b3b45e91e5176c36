"""How an attempt becomes pods: the launcher interface and its Indexed Job implementation.

An attempt is a set of objects built from the spec (`build`) and a state read back from what the
cluster reports (`attempt_state`). The Indexed Job launcher needs nothing beyond batch/v1; a
JobSet launcher would implement the same two methods against jobset.x-k8s.io.
"""
from __future__ import annotations

import shlex
import warnings
from typing import Any, Mapping, Protocol, Sequence

from cpt_api.exit_codes import EXIT_REFUSED
from cpt_api.kueue import LABEL_PRIORITY, LABEL_QUEUE
from cpt_api.spec import CptRunSpec
from cpt_api.storage import STAGING_DIR_ENV
from cpt_api.trainer_config import TrainerConfig
from ..policy.start import Start, assess, clock_start
from ..reconcile import AttemptState
from .attempts import alive
from .builders import (CONFIG_DIR, CONFIG_FILE, WORK_DIR, Object, RunRef, attempt_name,
                       config_map, headless_service, labels, metadata)
from .settings import Settings

GPU = "nvidia.com/gpu"
TORCHRUN = ["python", "-m", "cpt_trainer.launch"]
"""torchrun, exiting with the trainer's refusal code rather than its own 1 (see that module)."""


class Launcher(Protocol):
    kind: str
    """Kind of the object whose state is the attempt's state (Job, JobSet)."""

    def build(self, run: RunRef, spec: CptRunSpec, config: TrainerConfig) -> list[Object]:
        """Every object of one attempt, in creation order (the workload last)."""
        ...

    def attempt_state(self, number: int, workload: Mapping[str, Any] | None,
                      pods: Sequence[Mapping[str, Any]]) -> AttemptState:
        ...

    def start(self, spec: CptRunSpec, workload: Mapping[str, Any] | None,
              pods: Sequence[Mapping[str, Any]]) -> Start | None:
        """How the attempt's start goes (None without a live workload: nothing is starting)."""
        ...


TORCHRUN_EXIT_MARGIN_S = 20
"""Of the pod's grace, what torchrun keeps for itself to report and exit after its workers."""


def torchrun_args(spec: CptRunSpec, name: str, settings: Settings) -> list[str]:
    """torchrun's command line from torchx's distributed component, with the node rank and the
    rendezvous endpoint fixed to the Indexed Job's stable pod names."""
    from torchx.components import dist

    resources = spec.resources
    with warnings.catch_warnings():  # torchx warns about its own deprecations on every call
        warnings.simplefilter("ignore")
        app = dist.torchrun("--config", f"{CONFIG_DIR}/{CONFIG_FILE}", m="cpt_trainer", name=name,
                            j=f"{resources.nodes}x{resources.procs_per_node}",
                            rdzv_backend="c10d", rdzv_port=settings.rdzv_port)
    role = app.roles[0]
    # torchx wraps torchrun in `bash -c "<line>"` with shell-expanded placeholders; take the line
    # apart and set the values the Job gives us instead, so no shell is needed in the image.
    line = shlex.split(role.args[-1])
    assert line[0] == "torchrun", f"unexpected torchx entrypoint: {role.args}"
    endpoint = f"{name}-0.{name}:{settings.rdzv_port}"
    out: list[str] = []
    args = iter(line[1:])
    for arg in args:
        if arg in ("--rdzv_endpoint", "--rdzv_id", "--role"):
            value = next(args)
            if arg == "--rdzv_endpoint":
                out += ["--rdzv-endpoint", endpoint]
            elif arg == "--rdzv_id":
                out += ["--rdzv-id", name]
            elif value:
                out += ["--role", value]
            continue
        out.append(arg.replace("_", "-") if arg.startswith("--") else arg)
    # c10d would assign ranks itself; pinning them to the completion index keeps rank 0 (metrics,
    # checkpoint manifests) on pod 0, the one the rendezvous endpoint names.
    # torchrun forwards SIGTERM to the trainers, then kills them after its shutdown timeout
    # (30 s by default: too short for a sharded save); the kubelet's SIGKILL comes at the grace.
    shutdown = max(30, resources.stop_grace_seconds - TORCHRUN_EXIT_MARGIN_S)
    module = out.index("-m")
    return out[:module] + ["--node-rank=$(JOB_COMPLETION_INDEX)", f"--shutdown-timeout={shutdown}",
                           f"--max-restarts={spec.stop_policy.max_in_place_restarts}"] + out[module:]


def _resources(spec: CptRunSpec) -> Object:
    r = spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if r.gpus_per_node:
        requests[GPU] = limits[GPU] = str(r.gpus_per_node)
    if r.cpu:
        requests["cpu"] = limits["cpu"] = r.cpu
    if r.memory:
        requests["memory"] = limits["memory"] = r.memory
    if r.scratch:  # the work volume (checkpoint staging) counts against the pod's ephemeral storage
        requests["ephemeral-storage"] = limits["ephemeral-storage"] = r.scratch
    out: Object = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _container(spec: CptRunSpec, name: str, settings: Settings) -> Object:
    r = spec.resources
    # HOME on the work volume: libraries cache there, and the image's HOME may not be writable;
    # a save to object storage stages its files there too: on the volume `resources.scratch`
    # sizes, not in the container's own layer
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "HOME", "value": WORK_DIR},
           {"name": STAGING_DIR_ENV, "value": WORK_DIR}]
    container: Object = {
        "name": "trainer", "image": r.image or settings.trainer_image,
        "command": TORCHRUN, "args": torchrun_args(spec, name, settings), "env": env,
        "ports": [{"name": "c10d", "containerPort": settings.rdzv_port},
                  {"name": "metrics", "containerPort": settings.trainer_metrics_port}],
        "resources": _resources(spec),
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                         {"name": "dshm", "mountPath": "/dev/shm"},
                         {"name": "work", "mountPath": WORK_DIR}],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                            "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
    }
    if r.s3_secret_ref:
        container["envFrom"] = [{"secretRef": {"name": r.s3_secret_ref}}]
    return container


def pod_spec(spec: CptRunSpec, name: str, settings: Settings) -> Object:
    r = spec.resources
    pod: Object = {
        "restartPolicy": "Never",
        "subdomain": name,
        "containers": [_container(spec, name, settings)],
        "volumes": [{"name": "config", "configMap": {"name": name}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": r.shared_memory}},
                    {"name": "work", "emptyDir": {"sizeLimit": r.scratch} if r.scratch else {}}],
        "securityContext": {"runAsNonRoot": True, "runAsUser": settings.run_as_user,
                            "runAsGroup": settings.run_as_user, "fsGroup": settings.run_as_user,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "automountServiceAccountToken": False,
        # a stop lets the trainer write a consistent checkpoint before SIGKILL
        "terminationGracePeriodSeconds": r.stop_grace_seconds,
    }
    if r.node_selector:
        pod["nodeSelector"] = dict(r.node_selector)
    if r.tolerations:
        pod["tolerations"] = [t.dump() for t in r.tolerations]
    return pod


def replacement(spec: CptRunSpec) -> Object:
    """How the Job answers a failed pod. By default it fails at once: a new attempt from the
    newest checkpoint is the operator's decision (bounded by stopPolicy.maxAttemptRestarts).
    With stopPolicy.maxPodReplacements the failed pod is replaced on its own, by index, while the
    others wait in torchrun's rendezvous (their workers restart in place) and all continue from
    the attempt's newest checkpoint: no new Job, no other pod rescheduled. Past that (any index),
    or when a trainer refused its config (the same pod would refuse again), the Job fails. A pod
    evicted or preempted (DisruptionTarget) is replaced without counting."""
    replacements = spec.stop_policy.max_pod_replacements
    if replacements == 0:
        return {"backoffLimit": 0}
    return {
        "backoffLimitPerIndex": replacements,
        "maxFailedIndexes": 0,
        # the replacement only once the old pod is gone: one trainer per index, never two
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": {"rules": [
            {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                  "values": [EXIT_REFUSED]}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
    }


def indexed_job(run: RunRef, spec: CptRunSpec, attempt: int, settings: Settings) -> Object:
    name = attempt_name(run.name, attempt)
    nodes = spec.resources.nodes
    meta = metadata(run, attempt)
    pod_labels = labels(run, attempt)
    queue = spec.resources.queue
    if queue:
        meta["labels"][LABEL_QUEUE] = queue
        if spec.resources.priority_class:
            meta["labels"][LABEL_PRIORITY] = spec.resources.priority_class
    annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": str(settings.trainer_metrics_port),
                   "prometheus.io/path": "/metrics"}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": {
        "completionMode": "Indexed", "completions": nodes, "parallelism": nodes,
        # queued: no pod exists until Kueue admits the whole gang and unsuspends the Job
        **({"suspend": True} if queue else {}),
        **replacement(spec),
        "template": {"metadata": {"labels": pod_labels, "annotations": annotations},
                     "spec": pod_spec(spec, name, settings)}}}


def _terminations(pods: Sequence[Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    """(pod name, terminated state) of every container that ended with a non-zero code."""
    found = []
    for pod in pods:
        for cs in pod.get("status", {}).get("containerStatuses", []) or []:
            term = (cs.get("state") or {}).get("terminated") or {}
            if term and term.get("exitCode", 0) != 0:
                found.append((str(pod["metadata"]["name"]), term))
    return found


def failure_message(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> str:
    ended = _terminations(pods)
    if ended:  # the refusal first: the other pods of the gang only died of it
        name, term = min(ended, key=lambda e: e[1].get("exitCode") != EXIT_REFUSED)
        return (f"pod {name} exited with code {term.get('exitCode')}"
                f" ({term.get('reason') or 'Error'}) {term.get('message') or ''}").strip()
    for cond in job.get("status", {}).get("conditions", []) or []:
        if cond.get("type") in ("Failed", "FailureTarget") and cond.get("status") == "True":
            return f"job failed: {cond.get('reason', '')} {cond.get('message', '')}".strip()
    return "job failed"


class IndexedJobLauncher:
    kind = "Job"

    def __init__(self, settings: Settings):
        self.settings = settings

    def build(self, run: RunRef, spec: CptRunSpec, config: TrainerConfig) -> list[Object]:
        return [config_map(run, config.attempt, config), headless_service(run, config.attempt, self.settings),
                indexed_job(run, spec, config.attempt, self.settings)]

    def attempt_state(self, number: int, workload: Mapping[str, Any] | None,
                      pods: Sequence[Mapping[str, Any]]) -> AttemptState:
        """The attempt as the Job and its pods tell it. A Job that is gone while its pods still
        live (a stop in progress) is still running: the next attempt waits for the GPUs and for
        the old trainers' last checkpoint."""
        if number == 0:
            return AttemptState(number=0, state="absent")
        if workload is None or workload.get("metadata", {}).get("deletionTimestamp"):
            if any(alive(p) for p in pods):
                return AttemptState(number=number, state="running")
            return AttemptState(number=number, state="absent",
                                message=f"the Job of attempt {number} is gone (deleted, or its node was lost)")
        conditions = {c.get("type"): c.get("status") for c in workload.get("status", {}).get("conditions", []) or []}
        if conditions.get("Complete") == "True" or conditions.get("SuccessCriteriaMet") == "True":
            return AttemptState(number=number, state="succeeded")
        if conditions.get("Failed") == "True" or conditions.get("FailureTarget") == "True":
            refused = any(term.get("exitCode") == EXIT_REFUSED for _, term in _terminations(pods))
            return AttemptState(number=number, state="failed", message=failure_message(workload, pods),
                                refused=refused)
        return AttemptState(number=number, state="running")

    def start(self, spec: CptRunSpec, workload: Mapping[str, Any] | None,
              pods: Sequence[Mapping[str, Any]]) -> Start | None:
        """From the Job's clock (its startTime: Kueue's admission for a queued Job) and its pods,
        one a node (`policy.start`)."""
        if workload is None or workload.get("metadata", {}).get("deletionTimestamp"):
            return None
        return assess(pods, expected=spec.resources.nodes, since=clock_start(workload))
