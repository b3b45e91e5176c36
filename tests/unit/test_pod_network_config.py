"""The real node's cluster DNS and `kubernetes` Service stand-ins (tests/cluster/podnet.py) and
Prometheus's pod discovery, checked without starting anything."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import cluster, podnet


def test_the_gateway_is_the_first_address_of_the_nodes_subnet() -> None:
    assert podnet.gateway(ipaddress.ip_network("10.201.7.0/24")) == "10.201.7.1"


def test_the_kubernetes_service_is_the_first_address_of_the_service_range_on_443() -> None:
    assert cluster.KUBERNETES_SERVICE == ("10.0.0.1", 443)


def test_coredns_binds_only_the_gateway_and_keeps_its_own_ports_on_loopback() -> None:
    text = podnet.corefile(listen="10.201.7.1", kubeconfig="/k/coredns.kubeconfig",
                           ready_port=4001, health_port=4002)
    assert text.startswith(".:53 {")
    assert "    bind 10.201.7.1\n" in text
    assert "ready 127.0.0.1:4001" in text and "health 127.0.0.1:4002" in text
    assert "kubernetes cluster.local in-addr.arpa ip6.arpa {" in text
    assert "kubeconfig /k/coredns.kubeconfig cpt-test" in text  # write_kubeconfig's context
    assert "forward . /etc/resolv.conf" in text
    assert "pods " not in text  # no pod records, so no RBAC on pods


@pytest.mark.parametrize("listen", ["fd00::1", "not-an-address"], ids=["IPv6", "garbage"])
def test_coredns_refuses_a_listen_address_that_is_not_ipv4(listen: str) -> None:
    with pytest.raises(ValueError):
        podnet.corefile(listen=listen, kubeconfig="/k", ready_port=1, health_port=2)


def test_coredns_may_read_services_namespaces_and_endpointslices_only() -> None:
    granted = {(g, r) for rule in podnet.COREDNS_RULES for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == {("", "services"), ("", "namespaces"), ("discovery.k8s.io", "endpointslices")}
    assert all(rule["verbs"] == ["list", "watch"] for rule in podnet.COREDNS_RULES)


def test_the_dnat_matches_only_the_nodes_bridge_and_the_service_address() -> None:
    script = podnet.service_dnat(table="cptabc123", bridge="cptabc123", service=("10.0.0.1", 443),
                                 target=("192.0.2.2", 36443))
    assert script.startswith("table ip cptabc123 {")
    assert "type nat hook prerouting priority dstnat; policy accept;" in script
    (rule,) = [ln.strip() for ln in script.splitlines() if "dnat to" in ln]
    assert rule == 'iifname "cptabc123" ip daddr 10.0.0.1 tcp dport 443 dnat to 192.0.2.2:36443'


@pytest.mark.parametrize(("target", "error"), [
    (("127.0.0.1", 6443), "loopback"),
    (("192.0.2.2", 0), "bad port"),
    (("api.local", 6443), "IPv4"),
], ids=["loopback, which the kernel drops for packets from outside", "port 0", "a name"])
def test_the_dnat_refuses_a_target_pods_cannot_be_sent_to(target: tuple[str, int], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        podnet.service_dnat(table="t", bridge="b", service=("10.0.0.1", 443), target=target)


def test_a_table_whose_bridge_is_gone_is_a_leftover_and_nothing_else_is() -> None:
    listed = json.dumps({"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"table": {"family": "ip", "name": "cptdead01", "handle": 1}},
        {"table": {"family": "ip", "name": "cptlive02", "handle": 2}},
        {"table": {"family": "ip", "name": "nat", "handle": 3}},
        {"table": {"family": "inet", "name": "cptother", "handle": 4}},
    ]})
    assert podnet.stale_tables(listed, {"lo", "eth0", "cptlive02"}) == ["cptdead01"]
    assert podnet.stale_tables("", set()) == []


def test_prometheus_scrapes_discovered_pods_only_when_asked(tmp_path: Path) -> None:
    plain = cluster.Prometheus(tmp_path / "a")
    assert [job["job_name"] for job in json.loads(plain.config_file.read_text())["scrape_configs"]] == ["test"]
    assert plain.pod_discovery is None
    prom = cluster.Prometheus(tmp_path / "b", discover_pods=object())  # type: ignore[arg-type]
    jobs = {job["job_name"]: job for job in json.loads(prom.config_file.read_text())["scrape_configs"]}
    (sd,) = jobs["kubernetes-pods"]["file_sd_configs"]
    assert sd["files"] == [str(tmp_path / "b" / "prometheus" / "pods.json")]
    assert json.loads(Path(sd["files"][0]).read_text()) == []  # valid before the first listing


def pod(name: str, annotations: dict[str, str], ip: str | None = "10.201.7.5", phase: str = "Running",
        ports: tuple[int, ...] = ()) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "annotations": annotations},
            "spec": {"containers": [{"name": "main", "ports": [{"containerPort": p} for p in ports]}]},
            "status": {"podIP": ip, "phase": phase} if ip else {"phase": phase}}


SCRAPE = {"prometheus.io/scrape": "true"}


@pytest.mark.parametrize(("the_pod", "targets"), [
    (pod("run-0", {**SCRAPE, "prometheus.io/port": "9400", "prometheus.io/path": "/metrics"}),
     [("10.201.7.5:9400", "/metrics")]),
    (pod("p", {**SCRAPE, "prometheus.io/port": "9400", "prometheus.io/path": "/m"}), [("10.201.7.5:9400", "/m")]),
    (pod("p", {**SCRAPE}, ports=(8080, 9090)), [("10.201.7.5:8080", "/metrics"), ("10.201.7.5:9090", "/metrics")]),
    (pod("p", {**SCRAPE, "prometheus.io/port": "9400"}, ports=(8080,)), [("10.201.7.5:9400", "/metrics")]),
    (pod("p", {"prometheus.io/scrape": "false", "prometheus.io/port": "9400"}), []),
    (pod("p", {}, ports=(9400,)), []),
    (pod("p", {**SCRAPE, "prometheus.io/port": "9400"}, ip=None, phase="Pending"), []),
    (pod("p", {**SCRAPE, "prometheus.io/port": "9400"}, phase="Succeeded"), []),
], ids=["a trainer pod's annotations", "another path", "no port annotation: every container port",
        "the port annotation wins over container ports", "scrape false", "no annotations",
        "no IP yet", "ended"])
def test_annotated_pods_become_targets_at_their_pod_ip(
        the_pod: dict[str, Any], targets: list[tuple[str, str]]) -> None:
    groups = cluster.pod_targets([the_pod])
    assert [(g["targets"][0], g["labels"]["__metrics_path__"]) for g in groups] == targets
    for group in groups:
        assert len(group["targets"]) == 1
        assert (group["labels"]["namespace"], group["labels"]["pod"]) == ("ns", the_pod["metadata"]["name"])
