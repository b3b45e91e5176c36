"""Settings come from the environment names the Helm chart sets; metrics count what happened."""
from __future__ import annotations

from cpt_operator.kube.metrics import OperatorMetrics
from cpt_operator.kube.settings import Settings


def test_settings_read_the_charts_environment_names():
    settings = Settings.from_env({
        "PROMETHEUS_URL": "http://prometheus:9090/", "CPT_WEBHOOK_TOKEN": "t", "CPT_TRAINER_IMAGE": "img:1",
        "CPT_PEERING_NAME": "cpt", "CPT_NAMESPACES": "ml, research,", "CPT_METRICS_PORT": "9000",
        "CPT_WEBHOOK_PORT": "9001", "CPT_HEALTH_PORT": "9002"})
    assert (settings.prometheus_url, settings.webhook_token, settings.trainer_image, settings.peering) == \
        ("http://prometheus:9090", "t", "img:1", "cpt")
    assert settings.namespaces == ("ml", "research")
    assert (settings.metrics_port, settings.webhook_port, settings.health_port) == (9000, 9001, 9002)


def test_empty_environment_means_standalone_on_all_namespaces_with_default_ports():
    settings = Settings.from_env({})
    assert settings.peering == "" and settings.namespaces == () and settings.prometheus_url == ""
    assert (settings.metrics_port, settings.webhook_port, settings.health_port) == (8080, 8081, 8082)


def value(metrics: OperatorMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_runs_are_counted_by_phase_and_forgotten_when_deleted():
    metrics = OperatorMetrics()
    metrics.observe_run("u1", "ml", "a", "Running", 2, 16)
    metrics.observe_run("u2", "ml", "b", "Running", 1, 8)
    metrics.observe_run("u2", "ml", "b", "Succeeded", 1, 0)
    assert value(metrics, "cpt_runs", phase="Running") == 1 and value(metrics, "cpt_runs", phase="Succeeded") == 1
    assert value(metrics, "cpt_run_gpus", namespace="ml", run="a") == 16
    assert value(metrics, "cpt_run_attempt", namespace="ml", run="a") == 2
    metrics.forget_run("u1", "ml", "a")
    assert value(metrics, "cpt_runs", phase="Running") == 0
    assert value(metrics, "cpt_run_gpus", namespace="ml", run="a") is None


def test_peering_priority_is_explicit_or_unique_per_pod_and_stable() -> None:
    from cpt_operator.kube.settings import peering_priority

    assert peering_priority({"CPT_PEERING_PRIORITY": "7", "POD_NAME": "op-a"}) == 7
    a = peering_priority({"POD_NAME": "cpt-operator-5d9f-abcde"})
    assert a == peering_priority({"POD_NAME": "cpt-operator-5d9f-abcde"})  # survives restarts
    assert a != peering_priority({"POD_NAME": "cpt-operator-5d9f-fghij"})  # replicas differ
    assert 0 <= a < 2**31
