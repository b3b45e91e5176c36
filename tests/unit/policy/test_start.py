"""Why an attempt's pods do not start, read from pods as the kubelet and the scheduler write them.

The waiting reasons and messages are those Kubernetes 1.36's kubelet writes with containerd 2.x
(pkg/kubelet/images, kuberuntime); the scheduler's message is its FitError text."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from cpt_api.status import Reason
from cpt_operator.policy.start import MESSAGE_LIMIT, Cause, Start, assess, clock_start, deadline, overdue, pod_cause

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc)
IMAGE = "127.0.0.1:1/cpt/trainer:missing"
PULL_ERROR = (f'failed to pull and unpack image "{IMAGE}": failed to resolve image: failed to do request: '
              'Head "https://127.0.0.1:1/v2/cpt/trainer/manifests/missing": dial tcp 127.0.0.1:1: '
              'connect: connection refused')
NOT_ON_PATH = ('failed to create containerd task: failed to create shim task: OCI runtime create failed: runc '
               'create failed: unable to start container process: exec: "python": executable file not found '
               'in $PATH: unknown')
NO_GPU = ("0/4 nodes are available: 1 node(s) had untolerated taint {cpt-test/real-node: true}, 3 Insufficient "
          "nvidia.com/gpu. preemption: 0/4 nodes are available: 1 Preemption is not helpful for scheduling, "
          "3 No preemption victims found for incoming pod.")


def pod(name: str = "legal-7b-a1-0-x7k2p", *, waiting: tuple[str, str] | None = None, running: bool = False,
        terminated: dict[str, Any] | None = None, scheduled: tuple[str, str, str] | None = ("True", "", ""),
        phase: str = "Pending", init: tuple[str, str] | None = None) -> dict[str, Any]:
    """A trainer pod as the API returns it (only what the policy reads, in the kubelet's shapes)."""
    state: dict[str, Any] = {}
    if waiting is not None:
        state["waiting"] = {"reason": waiting[0], **({"message": waiting[1]} if waiting[1] else {})}
    if running:
        state["running"] = {"startedAt": "2026-12-01T10:00:05Z"}
    if terminated is not None:
        state["terminated"] = terminated
    status: dict[str, Any] = {"phase": phase, "conditions": []}
    if scheduled is not None:
        status["conditions"].append({"type": "PodScheduled", "status": scheduled[0],
                                     **({"reason": scheduled[1], "message": scheduled[2]} if scheduled[1] else {})})
    if state:
        status["containerStatuses"] = [{"name": "trainer", "image": IMAGE, "imageID": "", "ready": running,
                                        "restartCount": 0, "started": running, "state": state}]
    if init is not None:
        status["initContainerStatuses"] = [{"name": "init", "state": {"waiting": {"reason": init[0],
                                                                                  "message": init[1]}}}]
    return {"metadata": {"name": name, "namespace": "ml"}, "status": status}


def waiting_case(detail: str, message: str, reason: Reason, id: str) -> Any:
    """A pod whose trainer waits with the kubelet's `detail` and `message`, and the cause that
    quotes both."""
    return pytest.param(pod(waiting=(detail, message)), Cause(reason, "legal-7b-a1-0-x7k2p", detail, message), id=id)


@pytest.mark.parametrize("found, expected", [
    waiting_case("ErrImagePull", PULL_ERROR, Reason.image_pull_failed,
                 id="an image the node cannot pull is an image fault with the kubelet's message"),
    waiting_case("ImagePullBackOff", f'Back-off pulling image "{IMAGE}": ErrImagePull: {PULL_ERROR}',
                 Reason.image_pull_failed, id="the pull back-off is the same fault, quoting the pull's error"),
    waiting_case("ErrImageNeverPull", 'Container image "cpt/trainer:v9" is not present with pull policy of Never',
                 Reason.image_pull_failed, id="an image that is not on the node under pull policy Never"),
    waiting_case("InvalidImageName", 'Failed to apply default image tag "CPT/Trainer": couldn\'t parse image name '
                 '"CPT/Trainer": invalid reference format: repository name (CPT/Trainer) must be lowercase',
                 Reason.image_pull_failed, id="an image name that is no reference"),
    waiting_case("CreateContainerConfigError", 'secret "s3-creds" not found', Reason.container_config_error,
                 id="a missing Secret is a config fault that names it"),
    waiting_case("CreateContainerConfigError", "couldn't find key AWS_SECRET_ACCESS_KEY in Secret ml/s3-creds",
                 Reason.container_config_error, id="a missing key of a Secret likewise"),
    waiting_case("CreateContainerError", "context deadline exceeded", Reason.container_create_failed,
                 id="a container the runtime did not create"),
    waiting_case("RunContainerError", NOT_ON_PATH, Reason.container_run_failed,
                 id="a container the runtime did not run"),
    pytest.param(pod(terminated={"exitCode": 128, "reason": "StartError", "message": NOT_ON_PATH,
                                 "startedAt": "1970-01-01T00:00:00Z", "finishedAt": "2026-12-01T10:00:06Z"},
                     phase="Failed"),
                 Cause(Reason.container_run_failed, "legal-7b-a1-0-x7k2p", "StartError", NOT_ON_PATH),
                 id="a container that ended without having run (its command is not in the image)"),
    pytest.param(pod(scheduled=("False", "Unschedulable", NO_GPU)),
                 Cause(Reason.unschedulable, "legal-7b-a1-0-x7k2p", "Unschedulable", NO_GPU),
                 id="a pod no node fits, with the scheduler's reasons"),
    pytest.param(pod(init=("ErrImagePull", PULL_ERROR), waiting=("PodInitializing", "")),
                 Cause(Reason.image_pull_failed, "legal-7b-a1-0-x7k2p", "ErrImagePull", PULL_ERROR),
                 id="an init container's fault holds the pod back too"),
    pytest.param(pod(waiting=("ContainerCreating", "")),
                 Cause(Reason.starting, "legal-7b-a1-0-x7k2p", "ContainerCreating"),
                 id="a container being created is on its way, no fault"),
    pytest.param(pod(scheduled=("False", "SchedulingGated", "Scheduling is blocked due to non-empty scheduling gates")),
                 Cause(Reason.starting, "legal-7b-a1-0-x7k2p", "Pending"),
                 id="a pod held by a scheduling gate is waiting, not unschedulable"),
    pytest.param(pod(scheduled=None), Cause(Reason.starting, "legal-7b-a1-0-x7k2p", "Pending"),
                 id="a pod with no status yet is pending"),
    pytest.param(pod(running=True, phase="Running"), None, id="a running trainer has started"),
    pytest.param(pod(terminated={"exitCode": 1, "reason": "Error", "startedAt": "2026-12-01T10:00:05Z"},
                     phase="Failed"), None, id="a trainer that ran and failed had started"),
])
def test_pod_cause(found: dict[str, Any], expected: Cause | None) -> None:
    assert pod_cause(found) == expected


def test_a_cause_names_the_pod_and_quotes_the_kubelet() -> None:
    cause = pod_cause(pod(waiting=("CreateContainerConfigError", 'secret "s3-creds" not found')))
    assert cause is not None and cause.fault
    assert cause.describe() == 'pod legal-7b-a1-0-x7k2p: CreateContainerConfigError: secret "s3-creds" not found'
    assert Cause(Reason.starting, "", "1 of 2 pods exist").describe() == "1 of 2 pods exist"


def test_messages_are_trimmed_and_put_on_one_line() -> None:
    cause = pod_cause(pod(waiting=("ErrImagePull", "line one\n  line two " + "x" * 1000)))
    assert cause is not None and len(cause.message) == MESSAGE_LIMIT
    assert cause.message.startswith("line one line two x") and cause.message.endswith("…")


CREATING = pod("r-a1-1-bbbbb", waiting=("ContainerCreating", ""))
PULL = pod("r-a1-1-bbbbb", waiting=("ErrImagePull", PULL_ERROR))
UNSCHEDULABLE = pod("r-a1-0-aaaaa", scheduled=("False", "Unschedulable", NO_GPU))
RUNNING_0 = pod("r-a1-0-aaaaa", running=True, phase="Running")
RUNNING_1 = pod("r-a1-1-bbbbb", running=True, phase="Running")


@pytest.mark.parametrize("pods, expected, state, cause", [
    pytest.param([RUNNING_0, RUNNING_1], 2, "started", None, id="every pod running its trainer has started"),
    pytest.param([RUNNING_0], 2, "starting", Cause(Reason.starting, "", "1 of 2 pods exist"),
                 id="a pod the Job has not made yet keeps it starting"),
    pytest.param([RUNNING_0, CREATING], 2, "starting", Cause(Reason.starting, "r-a1-1-bbbbb", "ContainerCreating"),
                 id="the first pod not yet running says what it waits for"),
    pytest.param([RUNNING_0, PULL], 2, "starting", pod_cause(PULL),
                 id="one pod's fault is the attempt's"),
    pytest.param([UNSCHEDULABLE, PULL], 2, "starting", pod_cause(PULL),
                 id="an image fault tells more than an unschedulable pod (START_CAUSES order)"),
    pytest.param([CREATING, UNSCHEDULABLE], 2, "starting", pod_cause(UNSCHEDULABLE),
                 id="a fault wins over a pod on its way"),
])
def test_assess(pods: list[dict[str, Any]], expected: int, state: str, cause: Cause | None) -> None:
    assert assess(pods, expected=expected, since=T0) == Start(state, T0, cause)  # type: ignore[arg-type]


def test_without_a_clock_the_attempt_is_queued_whatever_its_pods_say() -> None:
    assert assess([PULL], expected=1, since=None) == Start("queued")


def job(start_time: str | None = None, *conditions: tuple[str, str]) -> dict[str, Any]:
    status: dict[str, Any] = {"conditions": [{"type": t, "status": s} for t, s in conditions]}
    if start_time:
        status["startTime"] = start_time
    return {"metadata": {"name": "r-a1"}, "status": status}


@pytest.mark.parametrize("found, expected", [
    pytest.param(job("2026-12-01T10:00:00Z"), T0, id="a Job's clock is its startTime"),
    pytest.param(job("2026-12-01T10:00:00Z", ("Suspended", "False")), T0,
                 id="a Job Kueue admitted (resumed) has its admission as startTime"),
    pytest.param(job(None, ("Suspended", "True")), None, id="a suspended (queued) Job has no clock"),
    pytest.param(job("2026-12-01T10:00:00Z", ("Suspended", "True")), None,
                 id="a Job suspended again (evicted) has none either"),
    pytest.param(job(None), None, id="a Job the controller has not synced yet has none"),
    pytest.param(None, None, id="no Job, no clock"),
])
def test_clock_start(found: dict[str, Any] | None, expected: datetime | None) -> None:
    assert clock_start(found) == expected


def test_the_deadline_passes_timeout_seconds_after_the_clock_began() -> None:
    starting = assess([PULL], expected=1, since=T0)
    assert deadline(starting, 900) == T0 + timedelta(seconds=900)
    assert not overdue(starting, T0 + timedelta(seconds=899), 900)
    assert overdue(starting, T0 + timedelta(seconds=900), 900)
    assert not overdue(assess([RUNNING_0], expected=1, since=T0), T0 + timedelta(days=1), 900)
    assert not overdue(Start("queued"), T0 + timedelta(days=1), 900) and deadline(Start("queued"), 900) is None
