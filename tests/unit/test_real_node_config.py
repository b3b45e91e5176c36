"""The real node's configuration (tests/cluster/node.py), checked without starting anything."""

from __future__ import annotations

import ipaddress
import random
import tomllib
from pathlib import Path

import pytest

from tests.cluster import node


def test_a_subnet_is_picked_clear_of_the_hosts_routes() -> None:
    taken = [ipaddress.ip_network("10.200.0.0/14")]  # the lower half of the pool
    for seed in range(20):
        subnet = node.pick_subnet(taken, random.Random(seed))
        assert subnet.prefixlen == 24
        assert subnet.subnet_of(ipaddress.ip_network("10.200.0.0/13"))
        assert not subnet.overlaps(taken[0])


def test_no_subnet_when_the_pool_is_all_taken() -> None:
    with pytest.raises(node.ComponentError, match="no free /24"):
        node.pick_subnet([ipaddress.ip_network("10.0.0.0/8")], random.Random(0))


def test_the_pod_network_keeps_its_addresses_in_the_nodes_dir(tmp_path: Path) -> None:
    conf = node.cni_conflist("cptabc123", ipaddress.ip_network("10.201.7.0/24"), tmp_path)
    bridge, portmap = conf["plugins"]
    assert bridge["bridge"] == "cptabc123" and len(bridge["bridge"]) <= 15  # IFNAMSIZ
    assert bridge["ipam"]["dataDir"] == str(tmp_path)
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.201.7.0/24", "gateway": "10.201.7.1"}]]
    assert portmap["capabilities"] == {"portMappings": True}


def test_containerd_keeps_every_path_in_the_nodes_dir_and_uses_cgroupfs(tmp_path: Path) -> None:
    text = node.containerd_config(tmp_path / "c", Path("/run/cpt-node/x/containerd.sock"),
                                  Path("/cni/bin"), tmp_path / "net.d", Path("/runc"))
    config = tomllib.loads(text)
    assert config["version"] == 3
    assert config["root"].startswith(str(tmp_path)) and config["state"].startswith(str(tmp_path))
    runtime = config["plugins"]["io.containerd.cri.v1.runtime"]
    assert runtime["restrict_oom_score_adj"] is True
    runc = runtime["containerd"]["runtimes"]["runc"]["options"]
    assert runc == {"BinaryName": "/runc", "Root": str(tmp_path / "c" / "runc"), "SystemdCgroup": False}
    images = config["plugins"]["io.containerd.cri.v1.images"]
    assert images["pinned_images"]["sandbox"] == node.pause_image()


def test_the_kubelet_runs_on_cgroup_v1_under_its_own_parent_and_taints_its_node(tmp_path: Path) -> None:
    config = node.kubelet_config(root=tmp_path, socket=Path("/s.sock"), cgroup_root="/cpt-abc",
                                 address="192.0.2.2", port=10250, healthz_port=10248,
                                 pods_log_dir=tmp_path / "logs", cluster_dns="10.201.7.1")
    assert config["failCgroupV1"] is False
    assert (config["cgroupDriver"], config["cgroupRoot"]) == ("cgroupfs", "/cpt-abc")
    assert config["containerRuntimeEndpoint"] == "unix:///s.sock"
    assert config["registerWithTaints"] == [node.REAL_NODE_TAINT]


def test_the_kubelet_gives_pods_the_nodes_coredns_and_the_cluster_domain(tmp_path: Path) -> None:
    config = node.kubelet_config(root=tmp_path, socket=Path("/s.sock"), cgroup_root="/cpt-abc",
                                 address="192.0.2.2", port=10250, healthz_port=10248,
                                 pods_log_dir=tmp_path / "logs", cluster_dns="10.201.7.1")
    assert config["clusterDNS"] == ["10.201.7.1"]
    assert config["clusterDomain"] == "cluster.local"


def test_the_placement_tolerates_exactly_the_real_nodes_taint() -> None:
    (toleration,) = node.REAL_NODE_PLACEMENT["tolerations"]
    taint = node.REAL_NODE_TAINT
    assert (toleration["key"], toleration["value"], toleration["effect"]) == (
        taint["key"], taint["value"], taint["effect"])
    assert node.REAL_NODE_PLACEMENT["nodeSelector"] == {"type": "real"}
