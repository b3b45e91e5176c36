"""The chart as helm renders it: lint, the objects each configuration produces, the operator's
contract (env, ports, probes), least-privilege RBAC, peering, and the values schema."""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helm.chartlib import CHART, FULL_VALUES, RULES, find, run, template

pytestmark = pytest.mark.helm

APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def deployment(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (dep,) = find(objects, "Deployment")
    return dep


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = deployment(objects)["spec"]["template"]["spec"]["containers"]
    return c


def env(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(objects)["env"]}


def rules_by_resource(role: dict[str, Any]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault(f"{group or 'core'}/{resource}", set()).update(rule["verbs"])
    return out


@pytest.mark.parametrize("values", [[], [FULL_VALUES]], ids=["default values", "full values"])
def test_lint_strict_passes(helm_bin: Path, values: list[Path]) -> None:
    argv: list[Any] = [helm_bin, "lint", "--strict", CHART]
    for path in values:
        argv += ["-f", path]
    proc = run(argv)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_default_values_render_the_cluster_wide_operator(helm_bin: Path) -> None:
    objects = template(helm_bin)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["ServiceAccount", "Secret", "ConfigMap", "ConfigMap", "ConfigMap",
                            "ClusterRole", "ClusterRoleBinding", "Service", "Deployment", "Pod"])
    (binding,) = find(objects, "ClusterRoleBinding")
    (sa,) = find(objects, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": "cpt-system"}]
    assert deployment(objects)["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_operator_container_follows_the_operator_contract(helm_bin: Path) -> None:
    objects = template(helm_bin)
    c = container(objects)
    assert c["command"] == ["python", "-m", "cpt_operator.kube"]
    assert c["image"] == f"ghcr.io/cpt-operator/cpt-operator:{APP_VERSION}"
    e = env(objects)
    assert e["CPT_TRAINER_IMAGE"] == f"ghcr.io/cpt-operator/cpt-trainer:{APP_VERSION}"
    assert e["PROMETHEUS_URL"].startswith("http://")
    assert (e["CPT_METRICS_PORT"], e["CPT_WEBHOOK_PORT"], e["CPT_HEALTH_PORT"]) == ("8080", "8081", "8082")
    assert e["CPT_NAMESPACES"] == "" and e["CPT_PEERING_NAME"] == ""
    (secret,) = find(objects, "Secret")
    assert e["CPT_WEBHOOK_TOKEN"] == {"secretKeyRef": {"name": secret["metadata"]["name"], "key": "token"}}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 8080, "webhook": 8081, "health": 8082}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    (service,) = find(objects, "Service")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
    assert service["spec"]["selector"].items() <= deployment(objects)["spec"]["template"]["metadata"]["labels"].items()


def test_tenancy_values_reach_the_admission_policy_and_the_operator_alike(helm_bin: Path) -> None:
    from cpt_api.tenancy import TENANCY_ENV, TenancyPolicy
    from tests.tenancy_cases import POLICY

    assert find(template(helm_bin), "ValidatingAdmissionPolicy") == []  # nothing restricted: no policy
    objects = template(helm_bin, values=[FULL_VALUES])
    assert TenancyPolicy.model_validate_json(env(objects)[TENANCY_ENV]) == TenancyPolicy.model_validate(POLICY)
    (policy,) = find(objects, "ValidatingAdmissionPolicy")
    (binding,) = find(objects, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    messages = [v["message"] for v in policy["spec"]["validations"]]
    assert len(messages) == 5 and all("resources." in m and "allow" in m for m in messages)


@pytest.mark.parametrize("values", [[], [FULL_VALUES]], ids=["default values", "full values"])
def test_every_pod_meets_the_restricted_pod_security_standard(helm_bin: Path, values: list[Path]) -> None:
    objects = template(helm_bin, values=values)
    pods = [deployment(objects)["spec"]["template"]["spec"]] + [p["spec"] for p in find(objects, "Pod")]
    assert len(pods) == 2
    for spec in pods:
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert sc["readOnlyRootFilesystem"] is True
        assert not spec.get("hostNetwork") and not spec.get("hostPID")


NAMESPACED_GRANTS = {
    "cpt.mlops.dev/cptruns": {"get", "list", "watch", "patch", "update"},
    "cpt.mlops.dev/cptruns/status": {"get", "patch", "update"},
    "cpt.mlops.dev/cptruns/finalizers": {"update"},
    "batch/jobs": {"create", "get", "list", "watch", "delete"},
    # runs with resources.queue: whether Kueue admitted, queued or evicted the attempt
    "kueue.x-k8s.io/workloads": {"get", "list", "watch"},
    "core/configmaps": {"create", "get", "list", "watch", "delete"},
    "core/services": {"create", "get", "list", "watch", "delete"},
    "core/pods": {"get", "list", "watch", "deletecollection"},
    "core/events": {"create", "patch"},
    "events.k8s.io/events": {"create", "patch"},
    # a run's storage is read with the keys of the Secret it names: get by name, never list
    "core/secrets": {"get"},
}


def test_cluster_role_grants_exactly_what_the_operator_uses(helm_bin: Path) -> None:
    (role,) = find(template(helm_bin), "ClusterRole")
    assert rules_by_resource(role) == {
        **NAMESPACED_GRANTS,
        "apiextensions.k8s.io/customresourcedefinitions": {"list", "watch"},
    }


def test_listed_namespaces_get_roles_and_nothing_cluster_wide(helm_bin: Path) -> None:
    objects = template(helm_bin, "--set", "operator.namespaces={ml-a,ml-b}")
    assert not find(objects, "ClusterRole") and not find(objects, "ClusterRoleBinding")
    roles = find(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml-a", "ml-b"]
    assert all(rules_by_resource(r) == NAMESPACED_GRANTS for r in roles)
    bindings = find(objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["ml-a", "ml-b"]
    assert all(b["subjects"][0]["namespace"] == "cpt-system" for b in bindings)
    assert env(objects)["CPT_NAMESPACES"] == "ml-a,ml-b"


def test_secrets_are_not_granted_when_turned_off(helm_bin: Path) -> None:
    (role,) = find(template(helm_bin, "--set", "rbac.readSecrets=false"), "ClusterRole")
    assert "core/secrets" not in rules_by_resource(role)


@pytest.mark.parametrize("args, peering, strategy", [
    ([], False, "Recreate"),
    (["--set", "operator.replicas=2"], True, "RollingUpdate"),
    (["--set", "operator.peering.enabled=true"], True, "RollingUpdate"),
], ids=["one replica runs standalone and never overlaps on rollout",
        "two replicas force peering on",
        "peering can be enabled for one replica"])
def test_peering_follows_the_replica_count(helm_bin: Path, args: list[str], peering: bool,
                                           strategy: str) -> None:
    objects = template(helm_bin, *args)
    assert deployment(objects)["spec"]["strategy"]["type"] == strategy
    peers = find(objects, "ClusterKopfPeering")
    (role,) = find(objects, "ClusterRole")
    if peering:
        assert [p["metadata"]["name"] for p in peers] == ["cpt-cpt-operator"]
        assert env(objects)["CPT_PEERING_NAME"] == "cpt-cpt-operator"
        assert rules_by_resource(role)["kopf.dev/clusterkopfpeerings"] == {"get", "list", "watch", "patch"}
    else:
        assert not peers and env(objects)["CPT_PEERING_NAME"] == ""
        assert "kopf.dev/clusterkopfpeerings" not in rules_by_resource(role)


def test_each_replica_gets_its_pod_name_for_a_peering_priority_of_its_own(helm_bin: Path) -> None:
    # kopf pauses every replica of the same priority, and all replicas share this env otherwise
    e = env(template(helm_bin, "--set", "operator.replicas=2", "--set", "operator.peering.lifetime=20"))
    assert e["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert e["CPT_PEERING_LIFETIME"] == "20"


def test_namespaced_peering_has_a_peering_object_and_role_rule_per_namespace(helm_bin: Path) -> None:
    objects = template(helm_bin, values=[FULL_VALUES])
    peers = find(objects, "KopfPeering")
    assert sorted((p["metadata"]["namespace"], p["metadata"]["name"]) for p in peers) == [
        ("team-a", "cpt-peers"), ("team-b", "cpt-peers")]
    assert not find(objects, "ClusterKopfPeering")
    for role in find(objects, "Role"):
        assert rules_by_resource(role)["kopf.dev/kopfpeerings"] == {"get", "list", "watch", "patch"}
    assert env(objects)["CPT_PEERING_NAME"] == "cpt-peers"


def token_of(objects: list[dict[str, Any]], key: str = "token") -> str:
    (secret,) = find(objects, "Secret")
    return base64.b64decode(secret["data"][key]).decode()


def test_webhook_token_is_generated_given_or_taken_from_an_existing_secret(helm_bin: Path) -> None:
    first, second = token_of(template(helm_bin)), token_of(template(helm_bin))
    assert len(first) == 40 and first.isalnum() and first != second
    given = "s3cr3t-t0ken-of-20-chars"
    assert token_of(template(helm_bin, "--set", f"webhook.token={given}")) == given
    objects = template(helm_bin, "--set", "webhook.existingSecret=alertmanager-token",
                       "--set", "webhook.secretKey=bearer")
    assert not find(objects, "Secret")
    assert env(objects)["CPT_WEBHOOK_TOKEN"] == {
        "secretKeyRef": {"name": "alertmanager-token", "key": "bearer"}}


def test_monitoring_objects_scrape_with_the_workloads_own_labels(helm_bin: Path) -> None:
    objects = template(helm_bin, values=[FULL_VALUES])
    (sm,) = find(objects, "ServiceMonitor")
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["honorLabels"] is True
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (pm,) = find(objects, "PodMonitor")
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    (pod_endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert pod_endpoint == {"port": "prom", "path": "/metrics", "interval": "10s", "honorLabels": False}
    (rule,) = find(objects, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def test_monitoring_objects_are_off_by_default(helm_bin: Path) -> None:
    objects = template(helm_bin)
    assert not [o for o in objects if o["apiVersion"].startswith("monitoring.coreos.com/")]


@pytest.mark.parametrize("args, label", [
    ([], ("grafana_dashboard", "1")),
    (["--set", "dashboards.label=grafana_dashboard_cpt", "--set-string", "dashboards.labelValue=yes"],
     ("grafana_dashboard_cpt", "yes")),
], ids=["sidecar label by default", "sidecar label configurable"])
def test_dashboards_ship_as_labelled_configmaps_holding_the_repo_json(
        helm_bin: Path, args: list[str], label: tuple[str, str]) -> None:
    maps = find(template(helm_bin, *args), "ConfigMap")
    shipped = {}
    for cm in maps:
        assert cm["metadata"]["labels"][label[0]] == label[1]
        (key, body), = cm["data"].items()
        shipped[key] = json.loads(body)
    files = {p.name: json.loads(p.read_text()) for p in (CHART / "dashboards").glob("*.json")}
    assert shipped == files and len(files) == 3


@pytest.mark.parametrize("args", [
    ["--set", "operator.replica=2"],
    ["--set", "operator.replicas=two"],
    ["--set", "operator.replicas=-1"],
    ["--set", "operator.peering.lifetime=5"],
    ["--set", "operator.namespaces={Team_A}"],
    ["--set", "operator.prometheusUrl=prometheus:9090"],
    ["--set", "operator.ports.metrics=70000"],
    ["--set", "image.pullPolicy=Sometimes"],
    ["--set", "service.type=ExternalName"],
    ["--set", "webhook.token=short"],
    ["--set", "metrics.podMonitor.interval=soon"],
    ["--set", "dashboards.enabled=yes-please"],
    ["--set", "tenancy.endpoints={s3.example.com}"],
    ["--set", "tenancy.imagess={registry.example.com/}"],
], ids=lambda a: a[-1])
def test_schema_rejects_bad_values(helm_bin: Path, args: list[str]) -> None:
    proc = run([helm_bin, "template", "cpt", CHART, "--kube-version", "1.36.3", *args])
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
