"""A real node for the test cluster: containerd 2.x + runc + CNI plugins + the kubelet.

Next to the kwok nodes (which run nothing), this node runs pods' containers for real: the
kubelet (same Kubernetes version as the control plane) talks CRI to containerd, which runs
them with runc in their own namespaces on a CNI bridge. Images come from OCI archives made
here (``images.sh``), imported with ``ctr``; there is no registry, so pods on this node use
``imagePullPolicy: Never`` (or IfNotPresent with a non-``latest`` tag).

Pods get cluster DNS and the `kubernetes` Service (the in-cluster config's API address) from
stand-ins for what kube-proxy and a CoreDNS Deployment would give: see podnet.py.

Several test sessions share one machine (CI, other worktrees), so everything that lives
outside the session's temp dir is named per node: the cgroup parent (``/cpt-<id>`` in every
v1 hierarchy), the bridge (``cpt<id>``) and its subnet, and the kubelet's ports. The node
registers with the taint ``cpt-test/real-node=true:NoSchedule`` and the label
``type=real``, so the operator's kwok-based tests never land here unless a pod tolerates it.

Stop order matters: the pods are deleted through the API first, so that the kubelet itself
kills their containers, tears down their network and unmounts their volumes; whatever a
crash left behind (tasks, mounts, the bridge, cgroups) is removed by hand after.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import random
import secrets
import shutil
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import podnet
from .cluster import (
    KUBERNETES_SERVICE,
    ComponentError,
    KubeCluster,
    Process,
    Workdir,
    binary,
    ensure_binaries,
    free_port,
    host_ip,
    run,
    versions,
    write_kubeconfig,
)

NODE_COMPONENTS = ("kubelet", "containerd", "runc", "cni", "pause", "coredns", "nftables")
REAL_NODE_TAINT = {"key": "cpt-test/real-node", "value": "true", "effect": "NoSchedule"}
REAL_NODE_LABEL = ("type", "real")
# A pod spec fragment that lets a pod (and only it) onto the real node.
REAL_NODE_PLACEMENT: dict[str, Any] = {
    "nodeSelector": {REAL_NODE_LABEL[0]: REAL_NODE_LABEL[1]},
    "tolerations": [{"key": REAL_NODE_TAINT["key"], "operator": "Equal",
                     "value": REAL_NODE_TAINT["value"], "effect": REAL_NODE_TAINT["effect"]}],
}
K8S_NAMESPACE = "k8s.io"  # the containerd namespace the CRI plugin keeps its images in
CGROUP_V1 = Path("/sys/fs/cgroup")
HOST_LOCK = Path("/run/cpt-node/real-node.lock")
"""Held by the one real node of this machine: the kubelet's device-plugin socket is host-wide."""


def pause_image() -> str:
    return f"localhost/pause:{versions()['PAUSE_VERSION']}"


def pick_subnet(taken: Sequence[ipaddress.IPv4Network], rng: random.Random) -> ipaddress.IPv4Network:
    """A /24 in 10.200.0.0/13 that overlaps none of ``taken`` (the host's routes): each
    node's bridge gets its own, so two sessions' pods never share addresses."""
    pool = ipaddress.ip_network("10.200.0.0/13")
    for _ in range(200):
        candidate = ipaddress.ip_network(
            (int(pool.network_address) + rng.randrange(pool.num_addresses // 256) * 256, 24))
        if not any(candidate.overlaps(t) for t in taken):
            return candidate
    raise ComponentError("no free /24 for the real node's bridge in 10.200.0.0/13")


def host_routes() -> list[ipaddress.IPv4Network]:
    out = subprocess.run(["ip", "-4", "-json", "route", "show", "table", "all"],
                         capture_output=True, text=True, check=True).stdout
    nets = []
    for route in json.loads(out or "[]"):
        dst = route.get("dst", "")
        if dst and dst != "default":
            try:
                nets.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
            except ValueError:
                continue
    return nets


def cni_conflist(bridge: str, subnet: ipaddress.IPv4Network, data_dir: Path) -> dict[str, Any]:
    """The pod network: one bridge per node, host-local addresses kept in the node's temp dir,
    hostPort mappings; no masquerade (pods reach the host's servers on the bridge address)."""
    gateway = podnet.gateway(subnet)
    return {
        "cniVersion": "1.0.0", "name": "cpt-pods",
        "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
             "hairpinMode": True,
             "ipam": {"type": "host-local", "dataDir": str(data_dir),
                      "ranges": [[{"subnet": str(subnet), "gateway": gateway}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def containerd_config(root: Path, socket: Path, cni_bin: Path, cni_conf: Path,
                      runc: Path) -> str:
    """containerd 2.x (config version 3), every path inside ``root``; cgroupfs, not systemd."""
    cri = "plugins.'io.containerd.cri.v1"
    return f"""version = 3
root = "{root / 'root'}"
state = "{root / 'state'}"
# NRI would listen on a host-wide socket; the tests do not use it.
disabled_plugins = ["io.containerd.nri.v1.nri"]

[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  level = "info"

[plugins.'io.containerd.internal.v1.opt']
  path = "{root / 'opt'}"
[{cri}.images']
  snapshotter = "overlayfs"
  [{cri}.images'.pinned_images]
    sandbox = "{pause_image()}"
[{cri}.runtime']
  # Root on this VM lacks CAP_SYS_RESOURCE, so no process may lower its oom_score_adj and
  # the kubelet's -998 for the pause container fails in runc. Clamped to containerd's own.
  restrict_oom_score_adj = true
[{cri}.runtime'.containerd]
  default_runtime_name = "runc"
  [{cri}.runtime'.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [{cri}.runtime'.containerd.runtimes.runc.options]
      BinaryName = "{runc}"
      Root = "{root / 'runc'}"
      SystemdCgroup = false
[{cri}.runtime'.cni]
  bin_dirs = ["{cni_bin}"]
  conf_dir = "{cni_conf}"
[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""


def kubelet_config(*, root: Path, socket: Path, cgroup_root: str, address: str, port: int,
                   healthz_port: int, pods_log_dir: Path, cluster_dns: str,
                   max_pods: int = 20) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        # This VM has cgroup v1 only; v1.35+ refuses it unless told.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        # Every session's pods under its own parent, so kubelets on one machine do not
        # fight over /kubepods.
        "cgroupRoot": cgroup_root,
        "containerRuntimeEndpoint": f"unix://{socket}",
        "address": address, "port": port, "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1", "healthzPort": healthz_port,
        # The API server reaches logs and exec without a client cert (a test cluster).
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "registerWithTaints": [REAL_NODE_TAINT],
        "podLogsDir": str(pods_log_dir),
        "maxPods": max_pods,
        "failSwapOn": False,
        # The host's iptables are shared with every other session: no KUBE-FIREWALL chains.
        "makeIPTablesUtilChains": False,
        "oomScoreAdj": 0,  # see restrict_oom_score_adj: -999 cannot be set here
        # The disk is shared with other sessions' caches: no evictions for disk pressure.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                         "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "syncFrequency": "5s", "fileCheckFrequency": "5s",
        "nodeStatusUpdateFrequency": "5s",
        # Pods' resolv.conf: the node's CoreDNS, `<ns>.svc.cluster.local` and co. as search
        # paths, ndots:5 (dnsPolicy ClusterFirst, the default).
        "clusterDNS": [cluster_dns], "clusterDomain": podnet.CLUSTER_DOMAIN,
        "resolvConf": "/etc/resolv.conf",
        "staticPodPath": str(root / "manifests"),
        "volumePluginDir": str(root / "volume-plugins"),
    }


class RealNode:
    """containerd + kubelet registered with ``kube`` as node ``name``.

    ``load_image(oci_archive)`` imports an image for the CRI; ``placement`` is the pod spec
    fragment that schedules a pod here; ``ctr(*args)`` runs ctr against this containerd.
    """

    def __init__(self, kube: KubeCluster, root: Path, name: str = "real-0",
                 labels: dict[str, str] | None = None) -> None:
        self.kube, self.name = kube, name
        self.id = secrets.token_hex(3)
        self.wd = Workdir(root, name)
        self.root = self.wd.path
        self.labels = {REAL_NODE_LABEL[0]: REAL_NODE_LABEL[1], "pool": "real", **(labels or {})}
        self.bridge = f"cpt{self.id}"
        self.cgroup_root = f"/cpt-{self.id}"
        # Unix socket paths are limited to 108 bytes; pytest's temp dirs can be long.
        self.sock_dir = Path("/run/cpt-node") / self.id
        self.socket = self.sock_dir / "containerd.sock"
        self.processes: list[Process] = []
        self.subnet: ipaddress.IPv4Network | None = None
        self.ip = ""  # the node's InternalIP: the host's own address
        self.dns_ip = ""  # the node's CoreDNS: its bridge's gateway address
        self._table = ""  # its nftables table (podnet.py), once made
        self.placement = REAL_NODE_PLACEMENT
        self._preloader = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-preload")
        self._preloads: dict[Path, Future[None]] = {}

    # -- lifecycle ---------------------------------------------------------
    def start(self, timeout: float = 90.0, lock_timeout: float = 3600.0,
              preload: Sequence[Path] = ()) -> RealNode:
        """``preload``: image archives imported in the background from the moment containerd
        serves, while the kubelet starts and tests run; ``load_image`` of one of them waits for
        that import instead of starting another (the trainer's takes ~50 s)."""
        ensure_binaries(NODE_COMPONENTS)
        self._lock_host(lock_timeout)
        try:
            self._start_network()
            self._start_containerd()
            for archive in preload:
                self._preloads[archive] = self._preloader.submit(self._import, archive)
            self._load_pause()
            self._start_kubelet(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _lock_host(self, timeout: float) -> None:
        """Wait for the machine's real-node lock: a second kubelet would take over the first's
        device-plugin socket, so sessions sharing a machine take turns instead."""
        HOST_LOCK.parent.mkdir(parents=True, exist_ok=True)
        self._lock = HOST_LOCK.open("a")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._lock.close()
                    raise ComponentError(f"another real node held {HOST_LOCK} for {timeout:.0f} s") from None
                time.sleep(2)

    def _start_network(self) -> None:
        """The bridge with its gateway address, the `kubernetes` Service's DNAT and CoreDNS on
        that address (podnet.py), before the kubelet writes any pod's resolv.conf."""
        ip = host_ip()
        if ip is None:
            raise ComponentError("the host has no default route: no address for the node")
        self.ip = ip
        self.subnet = pick_subnet(host_routes(), random.Random())
        podnet.make_bridge(self.bridge, self.subnet)
        self._table = self.bridge
        podnet.route_kubernetes_service(self._table, self.bridge, KUBERNETES_SERVICE,
                                        (self.ip, self.kube.port))
        self.dns_ip = podnet.gateway(self.subnet)
        dns = podnet.ClusterDNS(self.kube, self.root / "coredns", self.dns_ip).start()
        assert dns.process is not None
        self.processes.append(dns.process)

    def _start_containerd(self) -> None:
        self.sock_dir.mkdir(parents=True, exist_ok=True)
        cni_conf = self.root / "cni" / "net.d"
        cni_conf.mkdir(parents=True, exist_ok=True)
        assert self.subnet is not None
        (cni_conf / "10-cpt.conflist").write_text(json.dumps(
            cni_conflist(self.bridge, self.subnet, self.root / "cni" / "ipam"), indent=2))
        config = self.root / "containerd.toml"
        config.write_text(containerd_config(
            self.root / "containerd", self.socket, binary("bridge").parent, cni_conf, binary("runc")))
        env = {"PATH": f"{binary('containerd').parent}:{os.environ.get('PATH', '')}"}
        proc = Process("containerd", [binary("containerd"), "--config", config],
                       self.root / "containerd.log", env=env)
        self.processes.append(proc.start())
        proc.wait_until(lambda: self.ctr("version", check=False).returncode == 0,
                        "serving (ctr version)", 60)

    def ctr(self, *args: str, check: bool = True, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        return run([binary("ctr"), "--address", self.socket, "--namespace", K8S_NAMESPACE, *args],
                   check=check, timeout=timeout)

    def load_image(self, archive: Path) -> None:
        """Import an OCI or docker archive (``images.sh`` output) so that pods can use it by its
        name, or wait for its preload (``start``). Unpacked, its layer blobs are dropped from the
        content store: the snapshots are what containers run from, and the trainer's would
        otherwise be on disk twice (6.5 GB)."""
        pending = self._preloads.pop(archive, None)
        if pending is not None:
            pending.result()  # raises what the import raised
            return
        self._import(archive)

    def _import(self, archive: Path) -> None:
        self.ctr("images", "import", "--local", "--discard-unpacked-layers", str(archive), timeout=900)

    def _load_pause(self) -> None:
        from .images import pause_archive

        self.load_image(pause_archive())

    def _node_kubeconfig(self) -> Path:
        user = f"system:node:{self.name}"
        cert, key = self.kube.pki.issue(f"kubelet-{self.name}", user, organizations=["system:nodes"])
        # The API server authorizes by RBAC only (no Node authorizer): bind the node's user to
        # the built-in system:node role, as clusters without the Node authorizer did.
        self.kube.apply({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": f"cpt-test-node-{self.name}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "system:node"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        })
        return write_kubeconfig(self.root / "kubelet.kubeconfig", self.kube.server,
                                self.kube.pki.ca_cert, cert, key, user=user)

    def _make_cgroup_root(self) -> None:
        for hierarchy in CGROUP_V1.iterdir():
            if hierarchy.is_dir() and not hierarchy.is_symlink() and (hierarchy / "tasks").exists():
                mine = hierarchy / self.cgroup_root.lstrip("/")
                mine.mkdir(exist_ok=True)
                # A new v1 cpuset starts empty and takes no tasks until given the parent's.
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    if (mine / knob).exists():
                        (mine / knob).write_text((hierarchy / knob).read_text())

    def _start_kubelet(self, timeout: float) -> None:
        kubeconfig = self._node_kubeconfig()
        self._make_cgroup_root()
        kroot = self.root / "kubelet"
        (kroot / "manifests").mkdir(parents=True, exist_ok=True)
        config = self.root / "kubelet.yaml"
        self.kubelet_port, healthz = free_port(), free_port()
        config.write_text(json.dumps(kubelet_config(
            root=kroot, socket=self.socket, cgroup_root=self.cgroup_root, address=self.ip,
            port=self.kubelet_port, healthz_port=healthz, pods_log_dir=self.root / "pod-logs",
            cluster_dns=self.dns_ip), indent=2))
        labels = ",".join(f"{k}={v}" for k, v in self.labels.items())
        proc = Process("kubelet", [
            binary("kubelet"), f"--config={config}", f"--kubeconfig={kubeconfig}",
            f"--root-dir={kroot}", f"--hostname-override={self.name}", f"--node-ip={self.ip}",
            f"--node-labels={labels}", f"--cert-dir={kroot / 'pki'}", "--v=2",
        ], self.root / "kubelet.log", env={"PATH": f"{binary('runc').parent}:{os.environ.get('PATH', '')}"})
        self.processes.append(proc.start())
        self.kubelet = proc

        def ready() -> bool:
            node = self.kube.kubectl_json("get", "node", self.name)
            return any(c["type"] == "Ready" and c["status"] == "True"
                       for c in node.get("status", {}).get("conditions", []))

        proc.wait_until(ready, f"node {self.name} Ready", timeout, interval=1.0)

    def stop(self) -> None:
        """Pods first through the kubelet, then the processes, then what is left on the host."""
        self._preloader.shutdown(wait=True, cancel_futures=True)  # an import in flight ends first
        self._preloads.clear()
        kubelet = getattr(self, "kubelet", None)
        if kubelet is not None and kubelet.alive:
            self._drain()
        for proc in reversed(self.processes):
            if proc.name == "containerd":
                self._kill_tasks()
            proc.stop()
        self.processes.clear()
        self._clean_host()
        self._delete_state()
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.close()  # releases the flock
            self._lock = None

    def _delete_state(self) -> None:
        """Its images' snapshots are GBs (the trainer's alone 6.5 GB) and pytest keeps the temp
        dirs of the last three sessions: the node's state goes with it, its logs stay. Deleting
        it took 20-25 s, nearly all of it the trainer image's unpacked files, and nothing needs
        it done: the state is moved aside at once and a detached `rm` at the lowest CPU and I/O
        priority deletes it, so a test session's end does not wait on it."""
        trash = self.root / "deleting"
        trash.mkdir(exist_ok=True)
        for state in ("containerd", "kubelet"):
            with contextlib.suppress(FileNotFoundError):
                (self.root / state).rename(trash / state)
        idle_io = "ionice -c 3" if shutil.which("ionice") else ""
        # The shell starts rm in the background and returns: rm outlives it, parented to init.
        subprocess.run(["sh", "-c", f'nice -n 19 {idle_io} rm -rf "$1" </dev/null >/dev/null 2>&1 &', "sh",
                        str(trash)], check=True, start_new_session=True, timeout=30)

    def _drain(self, timeout: float = 60.0) -> None:
        self.kube.kubectl_result("delete", "pods", "--all-namespaces", "--grace-period=1",
                                 "--wait=false", f"--field-selector=spec.nodeName={self.name}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = self.kube.kubectl_result("get", "pods", "--all-namespaces", "-o", "name",
                                            f"--field-selector=spec.nodeName={self.name}")
            if left.returncode == 0 and not left.stdout.strip():
                return
            time.sleep(1)

    def _kill_tasks(self) -> None:
        """Containers the kubelet did not stop (it died, or the drain timed out)."""
        listed = self.ctr("tasks", "list", "-q", check=False).stdout.split()
        for task in listed:
            self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False, timeout=30)
        for task in listed:
            self.ctr("tasks", "delete", "-f", task, check=False, timeout=30)
        for container in self.ctr("containers", "list", "-q", check=False).stdout.split():
            self.ctr("containers", "delete", container, check=False, timeout=30)

    def _clean_host(self) -> None:
        # Mounts under the node's dirs (rootfs overlays, volume tmpfs, netns bind mounts),
        # deepest first, so that the temp dir can be deleted.
        mine = (str(self.root), str(self.sock_dir))
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        for point in sorted((m for m in mounts if m.startswith(mine)), key=len, reverse=True):
            run(["umount", "-l", point], check=False)
        # The table before the bridge: a table whose bridge is gone counts as a leftover.
        if self._table:
            podnet.remove_table(self._table)
        run(["ip", "link", "delete", self.bridge], check=False)
        # The kubelet links every container log into the host-wide /var/log/containers.
        for link in Path("/var/log/containers").glob("*.log"):
            if link.is_symlink() and os.readlink(link).startswith(str(self.root)):
                link.unlink(missing_ok=True)
        for hierarchy in CGROUP_V1.iterdir():
            top = hierarchy / self.cgroup_root.lstrip("/")
            if top.is_dir():
                for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts),
                                reverse=True):
                    with contextlib.suppress(OSError):
                        d.rmdir()
                with contextlib.suppress(OSError):
                    top.rmdir()
        shutil.rmtree(self.sock_dir, ignore_errors=True)

    def __enter__(self) -> RealNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
