"""The Kubernetes client wrapper against a scripted HTTP server: the real kubernetes client
library on the wire, answers chosen by the test."""
from __future__ import annotations

import inspect

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from cpt_operator.kube.backoff import Backoff
from cpt_operator.kube.client import Conflict, Forbidden, KubeClient, Rejected

from .cases import RUN
from .test_builders import attempt_objects

Answer = tuple[int, dict[str, Any]]


class ScriptedServer:
    """Answers each request with the first scripted answer whose (method, path prefix) matches,
    else 404, and records (method, path, body)."""

    def __init__(self) -> None:
        self.script: list[tuple[str, str, Answer]] = []
        self.requests: list[tuple[str, str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                outer.requests.append((self.command, self.path, body))
                status, doc = next((a for m, p, a in outer.script if m == self.command and self.path.startswith(p)),
                                   (404, {"kind": "Status", "message": "not found"}))
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def on(self, method: str, path: str, status: int, doc: dict[str, Any]) -> None:
        self.script.append((method, path, (status, doc)))


def kube_at(url: str, timeout: float = 5.0) -> KubeClient:
    cfg = client.Configuration()
    cfg.host = url
    return KubeClient(client.ApiClient(cfg), timeout=timeout)


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    s = ScriptedServer()
    yield s
    s.server.shutdown()


def config_map(data: str, resource_version: str | None = None) -> dict[str, Any]:
    built, *_ = attempt_objects(number=1)
    meta = built["metadata"] | ({"resourceVersion": resource_version} if resource_version else {})
    return built | {"metadata": meta, "data": {"trainer-config.json": data}}


JOB = attempt_objects(number=1)[-1]
INVALID = {"kind": "Status", "status": "Failure", "reason": "Invalid", "code": 422,
           "message": 'Job.batch "legal-7b-a1" is invalid: spec.template.spec.containers[0].resources.limits[cpu]: '
                      'Invalid value: "lots": must match the regex'}


@pytest.mark.parametrize("status, doc", [(422, INVALID), (400, {"message": "bad request"})],
                         ids=["an invalid object", "a malformed one"])
def test_an_object_the_api_server_refuses_is_rejected_with_its_message(server, status, doc):
    server.on("POST", "/apis/batch/v1/namespaces/ml/jobs", status, doc)
    with pytest.raises(Rejected) as raised:
        kube_at(server.url).ensure(JOB, RUN)
    assert str(raised.value) == f"Job legal-7b-a1: {doc['message']}"


QUOTA = {"kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403,
         "message": 'jobs.batch "legal-7b-a1" is forbidden: exceeded quota: jobs, requested: count/jobs.batch=1, '
                    'used: count/jobs.batch=4, limited: count/jobs.batch=4'}
DENIED = {"kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403,
          "message": 'admission webhook "policy.example.com" denied the request: outside business hours'}


@pytest.mark.parametrize("doc", [QUOTA, DENIED], ids=["a full quota", "an admission webhook"])
def test_a_forbidden_object_is_refused_for_now_not_for_good(server, doc):
    server.on("POST", "/apis/batch/v1/namespaces/ml/jobs", 403, doc)
    with pytest.raises(Forbidden) as raised:
        kube_at(server.url).ensure(JOB, RUN)
    assert str(raised.value) == f"Job legal-7b-a1: {doc['message']}" and not isinstance(raised.value, Rejected)


def test_starts_refused_for_now_are_tried_again_after_doubling_delays() -> None:
    backoff = Backoff()
    delays = [backoff.failed(100.0) for _ in range(9)]
    assert delays == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert backoff.waiting(399.9) and not backoff.waiting(400.0)


@pytest.mark.parametrize("status", [429, 500, 503], ids=["rate limited", "a server error", "unavailable"])
def test_errors_that_pass_on_their_own_stay_api_errors_to_retry(server, status):
    server.on("POST", "/apis/batch/v1/namespaces/ml/jobs", status, {"message": "later"})
    with pytest.raises(ApiException) as raised:
        kube_at(server.url).ensure(JOB, RUN)
    assert raised.value.status == status


def test_a_config_map_left_with_other_content_is_replaced(server):
    old = config_map('{"old": true}', "7")
    server.on("POST", "/api/v1/namespaces/ml/configmaps", 409, {"reason": "AlreadyExists"})
    server.on("GET", "/api/v1/namespaces/ml/configmaps/legal-7b-a1", 200, old)
    server.on("PUT", "/api/v1/namespaces/ml/configmaps/legal-7b-a1", 200, config_map('{"new": true}'))
    assert kube_at(server.url).ensure(config_map('{"new": true}'), RUN) is False
    method, _, body = server.requests[-1]
    assert method == "PUT" and body["data"] == {"trainer-config.json": '{"new": true}'}
    assert body["metadata"]["resourceVersion"] == "7"  # replaced only if nobody changed it since


def test_a_config_map_found_with_the_same_content_is_left_alone(server):
    same = config_map('{"same": true}', "7")
    server.on("POST", "/api/v1/namespaces/ml/configmaps", 409, {"reason": "AlreadyExists"})
    server.on("GET", "/api/v1/namespaces/ml/configmaps/legal-7b-a1", 200, same)
    assert kube_at(server.url).ensure(config_map('{"same": true}'), RUN) is False
    assert [m for m, _, _ in server.requests] == ["POST", "GET"]


def test_annotations_patched_at_a_stale_version_raise_conflict(server):
    server.on("PATCH", "/apis/cpt.mlops.dev/v1alpha1/namespaces/ml/cptruns/legal-7b", 409,
              {"reason": "Conflict", "message": "the object has been modified"})
    with pytest.raises(Conflict):
        kube_at(server.url).patch_annotations("ml", "legal-7b", {"cpt.mlops.dev/rollback-to": None}, "41")
    assert server.requests[0][2]["metadata"]["resourceVersion"] == "41"


CALLS: dict[str, Callable[[KubeClient], Any]] = {
    "ensure": lambda k: k.ensure(JOB, RUN),
    "read_job": lambda k: k.read_job("ml", "legal-7b-a1"),
    "pods": lambda k: k.pods("ml", "a=b"),
    "delete_job": lambda k: k.delete_job("ml", "legal-7b-a1"),
    "delete_pods": lambda k: k.delete_pods("ml", "a=b", 5),
    "run_jobs": lambda k: k.run_jobs(RUN),
    "read_run": lambda k: k.read_run("ml", "legal-7b"),
    "patch_status": lambda k: k.patch_status(RUN, "1", {}, {"phase": "Running"}),
    "patch_annotations": lambda k: k.patch_annotations("ml", "legal-7b", {"a": "b"}),
    "update_annotation": lambda k: k.update_annotation("ml", "legal-7b", "a", lambda run: "b"),
    "children": lambda k: k.children(RUN),
    "delete": lambda k: k.delete("ml", "Job", "legal-7b-a1"),
    "delete ConfigMap": lambda k: k.delete("ml", "ConfigMap", "legal-7b-a1"),
    "delete Service": lambda k: k.delete("ml", "Service", "legal-7b-a1"),
    "job_workload": lambda k: k.job_workload("ml", "uid-1"),
    "kueue_installed": lambda k: k.kueue_installed("ml"),
    "read_secret": lambda k: k.read_secret("ml", "s3"),
}


def test_every_call_of_the_client_is_checked_for_a_request_timeout() -> None:
    public = {name for name, _ in inspect.getmembers(KubeClient, inspect.isfunction) if not name.startswith("_")}
    assert public <= {name.split()[0] for name in CALLS}, public - {name.split()[0] for name in CALLS}


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts connections and never answers: a half-open connection, a hung API server."""
    sock = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    sock.close()
    for conn in held:
        conn.close()


@pytest.mark.parametrize("call", list(CALLS), ids=list(CALLS))
def test_every_call_gives_up_when_the_api_server_does_not_answer(silent_server, call):
    kube, outcome = kube_at(silent_server, timeout=0.2), list[BaseException]()

    def run() -> None:
        try:
            CALLS[call](kube)
        except BaseException as exc:  # noqa: BLE001 - the outcome is what is checked
            outcome.append(exc)

    started = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), f"{call} still waiting after 10 s: no request timeout"
    assert outcome and time.monotonic() - started < 10
    # the call gave up because the server did not answer in time, not for any other reason
    assert _timed_out(outcome[0]), repr(outcome[0])


def _timed_out(exc: BaseException | None) -> bool:
    from urllib3.exceptions import MaxRetryError, TimeoutError as Urllib3Timeout

    while exc is not None:
        if isinstance(exc, (Urllib3Timeout, TimeoutError)) or (
                isinstance(exc, MaxRetryError) and _timed_out(exc.reason)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
