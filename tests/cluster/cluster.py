"""A real test cluster made of local processes: Kubernetes, Prometheus, S3.

Every component is the real server binary, started as a subprocess on a free
127.0.0.1 port with a temporary data dir:

* etcd, kube-apiserver, kube-controller-manager and kube-scheduler are the
  real Kubernetes control plane (RBAC, admission, the Job controller, the
  garbage collector, the scheduler with its resource fit checks);
* kwok plays the kubelets: it keeps simulated Node objects alive and moves
  pods through their phases. No container ever runs (see stages.yaml);
* Prometheus (and optionally Alertmanager) from the Debian packages;
* versitygw, an S3 server with a posix backend;
* toxiproxy, a TCP proxy that injects faults (latency, resets, timeouts)
  between a client and one of the servers above.

The binaries come from ``build.sh`` (cache layout in README.md). Processes
run in their own process group, are killed when the Python process exits
(atexit, SIGTERM, and PR_SET_PDEATHSIG if the interpreter dies hard), and
every readiness wait ends in an error carrying the tail of the component's
log.

Typical use (pytest fixtures in tests/e2e/fixtures.py do this)::

    with KubeCluster(workdir) as kube:
        kube.kubectl("get", "nodes")
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
BUILD_SH = HERE / "build.sh"
STAGES_YAML = HERE / "stages.yaml"
VERSIONS_ENV = HERE / "versions.env"

T = TypeVar("T")


class ComponentError(RuntimeError):
    """A component failed to start, died, or did not become ready in time."""


class MissingBinaryError(RuntimeError):
    """A binary is neither in the cache nor buildable."""


# --------------------------------------------------------------------------
# Binaries
# --------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root of the binary, Go module and build caches (``CPT_CACHE_DIR``)."""
    return Path(os.environ.get("CPT_CACHE_DIR") or Path.home() / ".cache" / "cpt-operator")


def versions() -> dict[str, str]:
    """The KEY=VALUE pairs of versions.env, shared with build.sh."""
    out = {}
    for line in VERSIONS_ENV.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


# component -> (versions.env key, binaries it provides)
COMPONENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "kubernetes": (
        "KUBERNETES_VERSION",
        ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"),
    ),
    "etcd": ("ETCD_VERSION", ("etcd",)),
    "kwok": ("KWOK_VERSION", ("kwok",)),
    "helm": ("HELM_VERSION", ("helm",)),
    "versitygw": ("VERSITYGW_VERSION", ("versitygw",)),
    "toxiproxy": ("TOXIPROXY_VERSION", ("toxiproxy-server",)),
    "kueue": ("KUEUE_VERSION", ("kueue", "crds")),  # crds/: a folder of its manifests, see build.sh
    "prometheus": ("PROMETHEUS_VERSION", ("prometheus", "promtool", "alertmanager", "amtool")),
    # The real node (node.py).
    "kubelet": ("KUBERNETES_VERSION", ("kubelet",)),
    "containerd": ("CONTAINERD_VERSION", ("containerd", "containerd-shim-runc-v2", "ctr")),
    "runc": ("RUNC_VERSION", ("runc",)),
    "cni": ("CNI_PLUGINS_VERSION", ("bridge", "loopback", "host-local", "portmap")),
    "pause": ("PAUSE_VERSION", ("pause",)),
    "coredns": ("COREDNS_VERSION", ("coredns",)),
    "nftables": ("NFTABLES_VERSION", ("nft",)),
}


def component_dir(component: str) -> Path:
    key, _ = COMPONENTS[component]
    return cache_dir() / "bin" / f"{component}-{versions()[key]}"


def binary(name: str) -> Path:
    """Path of a cached binary by its name (``kube-apiserver``, ``helm``...)."""
    for component, (_, names) in COMPONENTS.items():
        if name in names:
            return component_dir(component) / name
    raise KeyError(f"unknown binary {name!r}")


def missing_components(components: Iterable[str]) -> list[str]:
    return [
        c for c in components
        if not all(os.access(component_dir(c) / n, os.X_OK) for n in COMPONENTS[c][1])
    ]


_build_lock = threading.Lock()


def ensure_binaries(components: Iterable[str], *, build: bool | None = None) -> None:
    """Make sure the binaries of ``components`` are cached, building them if needed.

    ``build`` defaults to true unless ``CPT_NO_BUILD=1``. A cold Kubernetes
    build takes tens of minutes; CI runs build.sh before the tests.
    """
    with _build_lock:
        missing = missing_components(components)
        if not missing:
            return
        if build is None:
            build = os.environ.get("CPT_NO_BUILD", "") not in ("1", "true", "yes")
        where = ", ".join(f"{c} ({component_dir(c)})" for c in missing)
        if not build:
            raise MissingBinaryError(
                f"missing test-cluster binaries: {where}; run `bash {BUILD_SH} {' '.join(missing)}`"
            )
        proc = subprocess.run(
            ["bash", str(BUILD_SH), *missing],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        still = missing_components(missing)
        if proc.returncode != 0 or still:
            tail = "\n".join(proc.stdout.splitlines()[-40:])
            raise MissingBinaryError(
                f"could not build test-cluster binaries {still or missing} "
                f"(build.sh exit {proc.returncode}):\n{tail}"
            )


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


_ports_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now and never handed out before by this process.

    The kernel may give the port of a socket just closed to the next bind, so two calls in a row
    could return one port twice: a CI run's etcd once got the same client and peer port and died
    on "address already in use".
    """
    with _ports_lock:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in _ports_handed_out:
                _ports_handed_out.add(port)
                return port


_PR_SET_PDEATHSIG = 1
_live: set[Process] = set()
_live_lock = threading.Lock()
_handlers_installed = False


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def stop_all() -> None:
    """Stop every process this module started (also registered with atexit)."""
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        proc.stop()


def _install_handlers() -> None:
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(stop_all)
    # SIGTERM (CI cancelling a job) would skip atexit; turn it into SystemExit
    # so that fixtures' finalizers and atexit still tear the cluster down.
    if threading.current_thread() is threading.main_thread() and (
        signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)
    ):
        def on_sigterm(signum: int, frame: Any) -> None:
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, on_sigterm)


class Process:
    """One server subprocess in its own process group, logging to a file."""

    def __init__(self, name: str, argv: Sequence[str | os.PathLike[str]], log: Path,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log = log
        self.env = env
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        _install_handlers()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            out.write(f"$ {' '.join(self.argv)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(self.env or {})}, cwd=self.cwd,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        with _live_lock:
            _live.add(self)
        return self

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def fail(self, what: str) -> ComponentError:
        state = "running" if self.alive else f"exited {self.popen.returncode if self.popen else '?'}"
        return ComponentError(
            f"{self.name}: {what} ({state}); last lines of {self.log}:\n{self.log_tail()}"
        )

    def wait_until(self, check: Callable[[], T | None], what: str, timeout: float = 60.0,
                   interval: float = 0.2) -> T:
        """Poll ``check`` until it returns a truthy value; fail if the process dies."""
        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while True:
            if not self.alive:
                raise self.fail(f"died while waiting for {what}")
            try:
                result = check()
                if result:
                    return result
            except Exception as exc:  # noqa: BLE001 - reported on timeout
                last_error = exc
            if time.monotonic() > deadline:
                detail = f" (last error: {last_error!r})" if last_error else ""
                raise self.fail(f"not {what} after {timeout:.0f} s{detail}")
            time.sleep(interval)

    def stop(self, timeout: float = 10.0) -> None:
        with _live_lock:
            _live.discard(self)
        if self.popen is None or self.popen.poll() is not None:
            return
        pgid = self.popen.pid
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            try:
                self.popen.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue


def run(argv: Sequence[str | os.PathLike[str]], *, check: bool = True, input: str | None = None,
        timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run a command to its end; ComponentError with its stderr when it fails and ``check``."""
    proc = subprocess.run([str(a) for a in argv], input=input, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise ComponentError(f"{' '.join(map(str, argv))} exited {proc.returncode}: "
                             f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def host_ip() -> str | None:
    """The address the host sends from by default (None without a default route). The real
    node's InternalIP: the kubelet refuses a loopback one, and pods on the node's bridge reach
    the host's servers there."""
    proc = subprocess.run(["ip", "-4", "-json", "route", "get", "1.1.1.1"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    return str(json.loads(proc.stdout)[0]["prefsrc"])


def http_get(url: str, context: ssl.SSLContext | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET returning (status, body) also for HTTP error statuses."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    status, _ = http_get(url, context)
    return status == 200


class Workdir:
    """A temp dir for one component's data, config and log."""

    def __init__(self, root: Path | None, name: str) -> None:
        base = Path(root) if root else Path(tempfile.mkdtemp(prefix="cpt-cluster-"))
        self.path = base / name
        self.path.mkdir(parents=True, exist_ok=True)

    def __truediv__(self, other: str) -> Path:
        return self.path / other


# --------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------


class PKI:
    """A throwaway CA, the API server's serving cert and client certs."""

    def __init__(self, directory: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.x509.oid import NameOID

        self._x509, self._hashes, self._ec, self._oid = x509, hashes, ec, NameOID
        self._serialization = serialization
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cpt-test-ca")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self._ca_name = name
        self._ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self._ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                              content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False,
                              encipher_only=False, decipher_only=False),
                critical=True)
            .sign(self._ca_key, hashes.SHA256())
        )
        self.ca_cert = self._write("ca.crt", self._ca_cert.public_bytes(serialization.Encoding.PEM))
        # Service-account token signing key pair (RSA, as kubeadm makes it).
        sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.sa_key = self._write("sa.key", self._key_pem(sa))
        self.sa_pub = self._write("sa.pub", sa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def _write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    def _key_pem(self, key: Any) -> bytes:
        s = self._serialization
        return key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())

    def issue(self, name: str, common_name: str, organizations: Sequence[str] = (),
              dns: Sequence[str] = (), ips: Sequence[str] = (),
              server: bool = False) -> tuple[Path, Path]:
        """Write ``name.crt``/``name.key`` signed by the CA; returns their paths."""
        x509, NameOID = self._x509, self._oid
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        now = datetime.datetime.now(datetime.timezone.utc)
        usage = x509.ExtendedKeyUsageOID.SERVER_AUTH if server else x509.ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs)).issuer_name(self._ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._ca_key, self._hashes.SHA256())
        s = self._serialization
        return (self._write(f"{name}.crt", cert.public_bytes(s.Encoding.PEM)),
                self._write(f"{name}.key", self._key_pem(key)))


def write_kubeconfig(path: Path, server: str, ca: Path, cert: Path, key: Path,
                     user: str = "admin") -> Path:
    """A kubeconfig with one cluster/user/context called ``cpt-test``."""
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "cpt-test",
        "clusters": [{"name": "cpt-test", "cluster": {
            "server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {
            "client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "cpt-test", "context": {"cluster": "cpt-test", "user": user}}],
    }
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------


class Etcd:
    def __init__(self, workdir: Workdir) -> None:
        self.workdir = workdir
        self.port, self.peer_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.process = Process("etcd", [
            binary("etcd"), "--name", "cpt-test", "--data-dir", workdir / "data",
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"cpt-test={peer}",
            # A test cluster survives no crash anyway; fsync only costs time.
            "--unsafe-no-fsync", "--log-level", "warn",
        ], workdir / "etcd.log")

    def start(self, timeout: float = 30.0) -> Etcd:
        self.process.start()
        self.process.wait_until(
            lambda: json.loads(http_get(f"{self.url}/health")[1]).get("health") == "true",
            "healthy", timeout)
        return self

    def stop(self) -> None:
        self.process.stop()


def etcd_compact(url: str) -> int:
    """Compact etcd's history up to its current revision, through its HTTP gateway (no etcdctl
    needed); returns that revision. A watch from an older resourceVersion that reaches etcd is
    then answered 410 Gone."""
    def post(path: str, body: dict[str, Any]) -> Any:
        req = urllib.request.Request(f"{url}/v3/{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    revision = int(post("kv/range", {"key": "AA=="})["header"]["revision"])
    post("kv/compaction", {"revision": revision, "physical": True})
    return revision


SERVICE_CIDR = "10.0.0.0/24"
# The `kubernetes` Service: the first address of the service range, port 443. Pods' in-cluster
# config dials it (KUBERNETES_SERVICE_HOST/PORT); on the real node a DNAT sends it to the API
# server (podnet.py).
KUBERNETES_SERVICE = (str(next(ipaddress.ip_network(SERVICE_CIDR).hosts())), 443)


class KubeAPIServer:
    def __init__(self, workdir: Workdir, pki: PKI, etcd_url: str) -> None:
        self.workdir, self.pki = workdir, pki
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        # Clients on the host dial 127.0.0.1; pods on the real node dial the `kubernetes`
        # Service's address, which a DNAT sends to the host's own address (podnet.py), so the
        # server listens on every address and its certificate names all three.
        self.host_ip = host_ip()
        ips = ["127.0.0.1", KUBERNETES_SERVICE[0], *([self.host_ip] if self.host_ip else [])]
        cert, key = pki.issue(
            "apiserver", "kube-apiserver", server=True, ips=ips,
            dns=["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                 "kubernetes.default.svc.cluster.local"])
        self.process = Process("kube-apiserver", [
            binary("kube-apiserver"),
            "--etcd-servers", etcd_url,
            # Advertised (the `kubernetes` Endpoints) as 127.0.0.1 still: without kube-proxy
            # nothing reads them, and some hosts have no default route to pick another.
            "--bind-address=0.0.0.0", "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--tls-cert-file={cert}", f"--tls-private-key-file={key}",
            f"--client-ca-file={pki.ca_cert}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--authorization-mode=RBAC",
            "--allow-privileged=true",
            "--enable-priority-and-fairness=false",
            # Node names (the default first choice) do not resolve here; the real node's
            # InternalIP is the host's address (node.py).
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            "--profiling=false",
            f"--cert-dir={workdir / 'certs'}",
            "--v=1",
        ], workdir / "kube-apiserver.log")

    def start(self, ssl_context: ssl.SSLContext, timeout: float = 90.0) -> KubeAPIServer:
        self.process.start()
        self.process.wait_until(
            lambda: _http_ok(f"{self.url}/readyz", ssl_context), "ready (/readyz)", timeout)
        return self

    def stop(self) -> None:
        self.process.stop()


@dataclass(frozen=True)
class NodeSpec:
    """A simulated node: kwok keeps it Ready; nothing runs on it."""

    name: str
    pool: str
    cpu: str = "32"
    memory: str = "256Gi"
    gpus: int = 0
    labels: dict[str, str] = field(default_factory=dict)

    def manifest(self) -> dict[str, Any]:
        resources = {"cpu": self.cpu, "memory": self.memory, "pods": "110",
                     "ephemeral-storage": "1Ti"}
        if self.gpus:
            resources["nvidia.com/gpu"] = str(self.gpus)
        labels = {
            "type": "kwok", "pool": self.pool, "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64", **self.labels,
        }
        if self.gpus:
            labels.setdefault("nvidia.com/gpu.product", "NVIDIA-H100-80GB-HBM3")
            labels.setdefault("nvidia.com/gpu.count", str(self.gpus))
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.name, "labels": labels,
                         "annotations": {"kwok.x-k8s.io/node": "fake"}},
            # Node status may be set on create; kwok's node-initialize stage
            # keeps the capacity/allocatable given here.
            "status": {"capacity": resources, "allocatable": resources},
        }


DEFAULT_NODES = (
    NodeSpec("gpu-h100-0", "h100", cpu="192", memory="2Ti", gpus=8),
    NodeSpec("gpu-h100-1", "h100", cpu="192", memory="2Ti", gpus=8),
    NodeSpec("cpu-0", "cpu", cpu="32", memory="128Gi"),
)


class KubectlError(RuntimeError):
    def __init__(self, args: Sequence[str], proc: subprocess.CompletedProcess[str]) -> None:
        self.proc = proc
        super().__init__(
            f"kubectl {' '.join(args)} exited {proc.returncode}:\n{proc.stderr.strip()}"
            + (f"\n{proc.stdout.strip()}" if proc.stdout.strip() else ""))


class KubeCluster:
    """etcd + kube-apiserver + controller-manager + scheduler + kwok + nodes.

    Attributes for tests: ``kubeconfig`` (Path, cluster-admin via a client
    cert in system:masters), ``server`` (API URL), ``bin`` (name -> Path of
    kubectl, kube-apiserver, ...), ``workdir`` (logs of every component).
    """

    def __init__(self, root: Path | None = None, nodes: Sequence[NodeSpec] = DEFAULT_NODES) -> None:
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="cpt-kube-"))
        self.workdir = self.root
        self.nodes = tuple(nodes)
        self.bin = {n: binary(n) for n in (*COMPONENTS["kubernetes"][1], "etcd", "kwok")}
        self.processes: list[Process] = []
        self.kubeconfig = self.root / "kubeconfig"
        self.server = ""
        self._stops: list[Callable[[], None]] = []

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> KubeCluster:
        ensure_binaries(["kubernetes", "etcd", "kwok"])
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        pki = PKI(self.root / "pki")
        self.pki = pki
        etcd = Etcd(Workdir(self.root, "etcd")).start()
        self._track(etcd.process)
        self.etcd_url = etcd.url
        admin_cert, admin_key = pki.issue("admin", "cpt-test-admin", organizations=["system:masters"])
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        ctx.load_cert_chain(str(admin_cert), str(admin_key))
        self.ssl_context = ctx
        apiserver = KubeAPIServer(Workdir(self.root, "kube-apiserver"), pki, etcd.url)
        self._track(apiserver.process)
        apiserver.start(ctx)
        self.server = apiserver.url
        write_kubeconfig(self.kubeconfig, self.server, pki.ca_cert, admin_cert, admin_key)

        self._start_controller_manager()
        self._start_scheduler()
        self._start_kwok()
        self.wait_for_default_service_account("default")
        self.create_nodes(self.nodes)

    def _track(self, process: Process) -> None:
        self.processes.append(process)

    @property
    def port(self) -> int:
        """The API server's port (it listens on every address, see KubeAPIServer)."""
        return int(urllib.parse.urlparse(self.server).port or 443)

    def user_kubeconfig(self, name: str, user: str, rules: list[dict[str, Any]]) -> Path:
        """A kubeconfig for a client of its own (a certificate for ``user``) allowed only
        ``rules`` cluster-wide, through a ClusterRole and binding ``cpt-test-<name>``."""
        role = f"cpt-test-{name}"
        subject = {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}
        self.apply([
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": {"name": role}, "rules": rules},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": role}, "subjects": [subject],
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role}},
        ])
        return self._component_kubeconfig(name, user)

    def _component_kubeconfig(self, name: str, user: str) -> Path:
        cert, key = self.pki.issue(name, user)
        return write_kubeconfig(self.root / f"{name}.kubeconfig", self.server,
                                self.pki.ca_cert, cert, key, user=user)

    def _wait_healthz(self, proc: Process, port: int, timeout: float = 60.0) -> None:
        # Their secure ports serve /healthz to anyone (RBAC allows it).
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        proc.wait_until(lambda: _http_ok(f"https://127.0.0.1:{port}/healthz", ctx),
                        "healthy (/healthz)", timeout)

    def _start_component(self, name: str, user: str, flags: list[str]) -> None:
        """A control-plane component with its own identity (as kubeadm does), serving /healthz
        on a free loopback port."""
        kc = self._component_kubeconfig(name.removeprefix("kube-"), user)
        port = free_port()
        wd = Workdir(self.root, name)
        proc = Process(name, [
            self.bin[name], f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1", f"--secure-port={port}", f"--cert-dir={wd / 'certs'}",
            "--leader-elect=false", "--v=1", *flags,
        ], wd / f"{name}.log")
        self._track(proc.start())
        self._wait_healthz(proc, port)

    def _start_controller_manager(self) -> None:
        # Each controller uses its own service account (--use-service-account-credentials),
        # so RBAC is real.
        self._start_component("kube-controller-manager", "system:kube-controller-manager", [
            "--controllers=*",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={self.pki.sa_key}",
            f"--root-ca-file={self.pki.ca_cert}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allocate-node-cidrs=false",
            # Quick reactions in tests (defaults are tuned for large clusters).
            "--concurrent-gc-syncs=5", "--node-monitor-grace-period=40s",
        ])

    def _start_scheduler(self) -> None:
        self._start_component("kube-scheduler", "system:kube-scheduler", [])

    def _start_kwok(self) -> None:
        wd = Workdir(self.root, "kwok")
        port = free_port()
        proc = Process("kwok", [
            self.bin["kwok"], f"--kubeconfig={self.kubeconfig}", f"--config={STAGES_YAML}",
            "--manage-all-nodes=false", "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            f"--server-address=127.0.0.1:{port}", "--node-ip=127.0.0.1", "--cidr=10.0.1.0/24",
            "--node-lease-duration-seconds=40", "--v=info",
        ], wd / "kwok.log")
        self._track(proc.start())
        proc.wait_until(lambda: _http_ok(f"http://127.0.0.1:{port}/healthz"), "healthy (/healthz)", 30)
        self.kwok = proc

    def stop(self) -> None:
        """Stop every component, newest first."""
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()

    def __enter__(self) -> KubeCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers for tests -------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """Environment for subprocesses (operator, helm) to talk to this cluster."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl_result(self, *args: str, input: str | None = None,
                       timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin["kubectl"]), f"--kubeconfig={self.kubeconfig}", *args],
            input=input, capture_output=True, text=True, timeout=timeout)

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 60.0) -> str:
        """Run kubectl against the cluster; its stdout, or KubectlError."""
        proc = self.kubectl_result(*args, input=input, timeout=timeout)
        if proc.returncode != 0:
            raise KubectlError(args, proc)
        return proc.stdout

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def apply(self, manifest: str | dict[str, Any] | list[dict[str, Any]],
              namespace: str | None = None) -> str:
        """``kubectl apply -f -`` of YAML text or object(s)."""
        if not isinstance(manifest, str):
            docs = manifest if isinstance(manifest, list) else [manifest]
            manifest = "\n---\n".join(json.dumps(d) for d in docs)
        ns = ["-n", namespace] if namespace else []
        return self.kubectl("apply", *ns, "-f", "-", input=manifest)

    def wait_for(self, check: Callable[[], T | None], what: str, timeout: float = 30.0,
                 interval: float = 0.25) -> T:
        """Poll ``check`` until truthy; on timeout a ComponentError with the logs of
        the component most likely involved (controller-manager, scheduler, kwok)."""
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while True:
            try:
                result = check()
                if result:
                    return result
            except Exception as exc:  # noqa: BLE001
                last = exc
            if time.monotonic() > deadline:
                dead = [p.name for p in self.processes if not p.alive]
                tails = "\n".join(
                    f"--- {p.name} ---\n{p.log_tail(10)}" for p in self.processes[2:])
                raise ComponentError(
                    f"timed out after {timeout:.0f} s waiting for {what}"
                    + (f" (last error: {last!r})" if last else "")
                    + (f"; DEAD: {dead}" if dead else "") + f"\n{tails}")
            time.sleep(interval)

    def wait_established(self, crd: str, timeout: float = 60.0) -> None:
        """Until the CRD serves. `kubectl wait --for=condition=Established` fails outright
        (instead of waiting) when it reads the CRD before its status has any condition."""
        self.wait_for(
            lambda: self.kubectl_result(
                "get", f"crd/{crd}", "-o",
                "jsonpath={.status.conditions[?(@.type=='Established')].status}").stdout == "True",
            f"CRD {crd} established", timeout=timeout)

    def create_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> str:
        """A new namespace, with `labels`, once pods can be created in it; its name."""
        self.kubectl("create", "namespace", name)
        if labels:
            self.kubectl("label", "namespace", name, *(f"{k}={v}" for k, v in labels.items()))
        self.wait_for_default_service_account(name)
        return name

    def wait_for_default_service_account(self, namespace: str, timeout: float = 30.0) -> None:
        """Pods are refused until the namespace's ``default`` ServiceAccount exists."""
        self.wait_for(
            lambda: self.kubectl_result("get", "serviceaccount", "default", "-n", namespace)
            .returncode == 0,
            f"serviceaccount {namespace}/default", timeout)

    def create_nodes(self, nodes: Iterable[NodeSpec], timeout: float = 30.0) -> None:
        nodes = list(nodes)
        # create, not apply: apply would drop the status (it is a subresource).
        self.kubectl("create", "-f", "-",
                     input="\n---\n".join(json.dumps(n.manifest()) for n in nodes))
        names = {n.name for n in nodes}

        def ready() -> bool:
            items = self.kubectl_json("get", "nodes")["items"]
            ok = {
                i["metadata"]["name"] for i in items
                if any(c["type"] == "Ready" and c["status"] == "True"
                       for c in i.get("status", {}).get("conditions", []))
                and not any(t.get("key", "").startswith("node.kubernetes.io/not-ready")
                            for t in i.get("spec", {}).get("taints", []) or [])
            }
            return names <= ok

        self.wait_for(ready, f"nodes {sorted(names)} Ready", timeout)

    def pods(self, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        args = ["get", "pods", "-n", namespace] + (["-l", selector] if selector else [])
        return list(self.kubectl_json(*args)["items"])

    def annotate_pods(self, namespace: str, selector: str, annotation: str) -> None:
        """E.g. ``annotate_pods(ns, "job-name=x", "cpt-test/complete=true")``."""
        self.kubectl("annotate", "pods", "-n", namespace, "-l", selector, annotation, "--overwrite")


# --------------------------------------------------------------------------
# Prometheus and Alertmanager
# --------------------------------------------------------------------------


SCRAPE_ANNOTATION = "prometheus.io/scrape"
PORT_ANNOTATION = "prometheus.io/port"
PATH_ANNOTATION = "prometheus.io/path"


def pod_targets(pods: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """file_sd target groups for the pods annotated ``prometheus.io/scrape: "true"``: what
    ``kubernetes_sd_configs`` (role pod) with the usual annotation relabelling gives.

    A stand-in: Debian's Prometheus 2.42 is built without the Kubernetes discovery (it refuses
    ``kubernetes_sd_configs``: "field kubernetes_sd_configs not found"), so the harness lists
    pods itself. Same rules: ``prometheus.io/port`` (else every declared container port),
    ``prometheus.io/path`` (else /metrics), targets labelled ``namespace`` and ``pod`` as a
    PodMonitor labels them; pods without an IP yet, and pods that have ended, are left out.
    """
    groups = []
    for pod in pods:
        meta, status = pod.get("metadata", {}), pod.get("status", {})
        annotations = meta.get("annotations") or {}
        ip = status.get("podIP")
        if annotations.get(SCRAPE_ANNOTATION) != "true" or not ip \
                or status.get("phase") in ("Succeeded", "Failed"):
            continue
        ports = [annotations[PORT_ANNOTATION]] if PORT_ANNOTATION in annotations else [
            str(p["containerPort"]) for c in pod.get("spec", {}).get("containers", [])
            for p in c.get("ports") or []]
        labels = {"namespace": meta.get("namespace", ""), "pod": meta.get("name", ""),
                  "__metrics_path__": annotations.get(PATH_ANNOTATION) or "/metrics"}
        groups += [{"targets": [f"{ip}:{port}"], "labels": labels} for port in ports]
    return groups


class PodDiscovery:
    """Lists the cluster's pods every ``interval`` seconds and writes ``pod_targets`` into a
    file_sd file (only when it changed): the stand-in for ``kubernetes_sd_configs``."""

    def __init__(self, kube: KubeCluster, path: Path, interval: float = 1.0) -> None:
        self.kube, self.path, self.interval = kube, path, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pod-discovery", daemon=True)
        self.write([])

    def write(self, groups: list[dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups, indent=2))
        tmp.replace(self.path)  # atomic: Prometheus never reads half a file

    def start(self) -> PodDiscovery:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _loop(self) -> None:
        last: list[dict[str, Any]] = []
        while not self._stop.wait(self.interval):
            status, body = http_get(f"{self.kube.server}/api/v1/pods", self.kube.ssl_context)
            if status != 200:
                continue  # the API server is restarting or gone; the last targets stay
            groups = pod_targets(json.loads(body)["items"])
            if groups != last:
                self.write(groups)
                last = groups


class Prometheus:
    """Prometheus scraping targets listed in a file_sd JSON file the test writes.

    ``add_target("127.0.0.1:9000", {"job_kind": "trainer"})`` rewrites the file;
    Prometheus notices it (inotify) and scrapes every second. Rule files go in
    ``rules_dir`` (``add_rules``) and are loaded by ``reload()``.

    With ``discover_pods`` (a KubeCluster) a second job, ``kubernetes-pods``, scrapes the
    pods annotated ``prometheus.io/scrape: "true"`` at their pod IP (reachable from the host for
    pods on the real node's bridge), found by ``PodDiscovery`` (a stand-in for
    ``kubernetes_sd_configs``, which Debian's build lacks). ``host``: the address it listens
    on; pods on the real node reach it at ``real_node.ip``, not at 127.0.0.1.
    """

    def __init__(self, root: Path | None = None, alertmanager_url: str | None = None,
                 scrape_interval: str = "1s", discover_pods: KubeCluster | None = None,
                 host: str = "127.0.0.1") -> None:
        self.wd = Workdir(root, "prometheus")
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        self.targets_file = self.wd / "targets.json"
        self.rules_dir = self.wd / "rules"
        self.rules_dir.mkdir(exist_ok=True)
        self._targets: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._write_targets()
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval,
                       "scrape_timeout": scrape_interval},
            "rule_files": [str(self.rules_dir / "*.yml")],
            "scrape_configs": [{
                "job_name": "test",
                "file_sd_configs": [{"files": [str(self.targets_file)], "refresh_interval": "1s"}],
            }],
        }
        self.pod_discovery: PodDiscovery | None = None
        if discover_pods is not None:
            pods_file = self.wd / "pods.json"
            self.pod_discovery = PodDiscovery(discover_pods, pods_file)
            config["scrape_configs"].append({
                "job_name": "kubernetes-pods",
                "file_sd_configs": [{"files": [str(pods_file)], "refresh_interval": "1s"}],
            })
        if alertmanager_url:
            alertmanager = urllib.parse.urlparse(alertmanager_url).netloc
            config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
        self.config_file = self.wd / "prometheus.yml"
        self.config_file.write_text(json.dumps(config, indent=2))
        self.process = Process("prometheus", [
            binary("prometheus"), f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.wd / 'data'}",
            f"--web.listen-address={host}:{self.port}",
            "--web.enable-lifecycle", "--web.enable-admin-api", "--log.level=warn",
        ], self.wd / "prometheus.log")

    def start(self, timeout: float = 30.0) -> Prometheus:
        ensure_binaries(["prometheus"])
        self.process.start()
        self.process.wait_until(lambda: _http_ok(f"{self.url}/-/ready"), "ready (/-/ready)", timeout)
        if self.pod_discovery is not None:
            self.pod_discovery.start()
        return self

    def stop(self) -> None:
        if self.pod_discovery is not None:
            self.pod_discovery.stop()
        self.process.stop()

    def _write_targets(self) -> None:
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._targets, indent=2))
        tmp.replace(self.targets_file)  # atomic: never a half-written file

    def add_target(self, address: str, labels: dict[str, str] | None = None) -> None:
        """Scrape ``host:port`` (``/metrics``) with extra target labels."""
        with self._lock:
            self._targets.append({"targets": [address], "labels": dict(labels or {})})
            self._write_targets()

    def remove_target(self, address: str) -> None:
        with self._lock:
            self._targets = [t for t in self._targets if address not in t["targets"]]
            self._write_targets()

    def clear_targets(self) -> None:
        with self._lock:
            self._targets = []
            self._write_targets()

    def add_rules(self, name: str, rules_yaml: str, reload: bool = True) -> Path:
        """Write a rule file (``groups: ...``) and reload; promtool checks it first."""
        path = self.rules_dir / f"{name}.yml"
        path.write_text(rules_yaml)
        check = subprocess.run([str(binary("promtool")), "check", "rules", str(path)],
                               capture_output=True, text=True)
        if check.returncode != 0:
            path.unlink()
            raise ValueError(f"invalid rules {name}: {check.stdout}{check.stderr}")
        if reload:
            self.reload()
        return path

    def reload(self) -> None:
        req = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            if resp.status != 200:
                raise self.process.fail(f"reload answered {resp.status}")

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = http_get(url, timeout=10)
        data = json.loads(body)
        if status != 200 or data.get("status") != "success":
            raise RuntimeError(f"Prometheus {path} {params}: {status} {data.get('error', body[:300])}")
        return data["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; the ``result`` list (vector samples ``{metric, value}``)."""
        return list(self.api("query", query=promql)["result"])

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets")["activeTargets"])

    def wait_for(self, promql: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Query until the result is non-empty (e.g. a metric has been scraped)."""
        return self.process.wait_until(
            lambda: self.query(promql), f"returning data for {promql!r}", timeout, interval=0.5)


class Alertmanager:
    """Alertmanager; by default with a receiver-less route (alerts are kept, not sent)."""

    def __init__(self, root: Path | None = None, receivers: Sequence[dict[str, Any]] = ()) -> None:
        """``receivers``: Alertmanager receiver configs; alerts go to the first one (default: a
        receiver that sends nothing)."""
        self.wd = Workdir(root, "alertmanager")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_file = self.wd / "alertmanager.yml"
        receivers = list(receivers) or [{"name": "null"}]
        self.config_file.write_text(json.dumps({
            "route": {"receiver": receivers[0]["name"], "group_wait": "0s", "group_interval": "1s",
                      "repeat_interval": "1m"},
            "receivers": receivers,
        }))
        self.process = Process("alertmanager", [
            binary("alertmanager"), f"--config.file={self.config_file}",
            f"--storage.path={self.wd / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--cluster.listen-address=",  # no gossip port (would bind 0.0.0.0:9094)
            "--log.level=warn",
        ], self.wd / "alertmanager.log")

    def start(self, timeout: float = 30.0) -> Alertmanager:
        ensure_binaries(["prometheus"])
        self.process.start()
        self.process.wait_until(lambda: _http_ok(f"{self.url}/-/ready"), "ready (/-/ready)", timeout)
        return self

    def stop(self) -> None:
        self.process.stop()

    def alerts(self) -> list[dict[str, Any]]:
        status, body = http_get(f"{self.url}/api/v2/alerts")
        if status != 200:
            raise RuntimeError(f"alertmanager /api/v2/alerts: {status} {body[:300]!r}")
        return list(json.loads(body))


# --------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Request:
    """One request the server answered (versitygw logs no byte counts: it writes 0)."""

    bucket: str
    key: str
    status: int


# owner bucket [time] ip requester request-id operation key request-uri status ...
_ACCESS = re.compile(r"^\S+ (?P<bucket>\S+) \[[^]]*\] \S+ \S+ \S+ (?P<operation>\S+) (?P<key>\S+) "
                     r"\S+ (?P<status>\d+) ")


class S3Server:
    """versitygw serving a posix dir as S3 (path-style, region us-east-1). The keys it starts
    with are its root account's, which reaches every bucket; `create_user` adds accounts that
    reach only the buckets they own (versitygw's internal IAM)."""

    ACCESS_KEY = "cpt-test-access"
    SECRET_KEY = "cpt-test-secret-key-0123456789"
    REGION = "us-east-1"

    def __init__(self, root: Path | None = None, host: str = "127.0.0.1") -> None:
        # host: the real node's pods reach the host at its own address, not at 127.0.0.1.
        self.wd = Workdir(root, "s3")
        self.port = free_port()
        self.endpoint = f"http://{host}:{self.port}"
        self.key, self.secret = self.ACCESS_KEY, self.SECRET_KEY
        data, meta, iam = self.wd / "data", self.wd / "meta", self.wd / "iam"
        for folder in (data, meta, iam):
            folder.mkdir(exist_ok=True)
        self.access_log = self.wd / "access.log"
        self.process = Process("versitygw", [
            binary("versitygw"), "--port", f"{host}:{self.port}",
            "--access", self.key, "--secret", self.secret, "--region", self.REGION, "--iam-dir", iam,
            "--access-log", self.access_log,
            # Metadata in a sidecar dir instead of xattrs, which not every
            # temp filesystem (overlayfs, tmpfs) supports.
            "posix", "--sidecar", meta, data,
        ], self.wd / "versitygw.log")
        self._bucket_seq = 0

    def start(self, timeout: float = 30.0) -> S3Server:
        ensure_binaries(["versitygw"])
        self.process.start()
        # Any HTTP answer (403 without credentials) means it is serving.
        self.process.wait_until(lambda: http_get(self.endpoint + "/")[0] > 0, "serving", timeout)
        return self

    def stop(self) -> None:
        self.process.stop()

    def requests(self, operation: str = "s3_GetObject") -> list[S3Request]:
        """What the server has answered so far, from its access log (AWS's server access log
        format), of one operation."""
        found = []
        if self.access_log.exists():
            for line in self.access_log.read_text().splitlines():
                match = _ACCESS.match(line)
                if match and match["operation"] == operation:
                    found.append(S3Request(match["bucket"], match["key"], int(match["status"])))
        return found

    def create_user(self, key: str, secret: str) -> None:
        """An account that reaches only the buckets it owns (none yet)."""
        subprocess.run([binary("versitygw"), "admin", "--access", self.key, "--secret", self.secret,
                        "--endpoint-url", self.endpoint, "create-user", "--access", key, "--secret", secret,
                        "--role", "user"], check=True, capture_output=True, timeout=30)

    def env_of(self, key: str, secret: str) -> dict[str, str]:
        """`env` for another account."""
        return {**self.env, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}

    @property
    def env(self) -> dict[str, str]:
        """AWS_* variables for clients (the trainer, boto3, s3fs) in subprocesses."""
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_ENDPOINT_URL_S3": self.endpoint,
                "AWS_DEFAULT_REGION": self.REGION, "AWS_REGION": self.REGION}

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.key,
            aws_secret_access_key=self.secret, region_name=self.REGION,
            config=Config(s3={"addressing_style": "path"}))

    def filesystem(self) -> Any:
        """An ``s3fs.S3FileSystem`` for this server (cache off: tests read their writes)."""
        import s3fs

        return s3fs.S3FileSystem(
            key=self.key, secret=self.secret, use_listings_cache=False,
            client_kwargs={"endpoint_url": self.endpoint, "region_name": self.REGION})

    def create_bucket(self, name: str | None = None) -> str:
        if name is None:
            self._bucket_seq += 1
            name = f"test-{os.getpid()}-{self._bucket_seq}-{int(time.time() * 1000) % 10**6}"
        self.client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Empty and delete a bucket."""
        client = self.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=name, Key=obj["Key"])
        client.delete_bucket(Bucket=name)


# --------------------------------------------------------------------------
# Fault injection
# --------------------------------------------------------------------------


class Toxiproxy:
    """toxiproxy-server: TCP proxies whose faults are switched on and off through its HTTP API.

    ``proxy("api", "127.0.0.1:6443")`` returns the address to give clients instead of the
    server's; ``add_toxic`` / ``remove_toxic`` set faults (``latency``, ``reset_peer``,
    ``timeout``, ``slow_close``...) on new and open connections alike; ``cut`` closes every open
    connection (a dropped watch stream) and lets new ones through again. The proxies are plain
    TCP, so TLS passes through untouched (the API server's certificate names 127.0.0.1).
    """

    def __init__(self, root: Path | None = None, seed: int = 0) -> None:
        self.wd = Workdir(root, "toxiproxy")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = Process("toxiproxy", [
            binary("toxiproxy-server"), "-host", "127.0.0.1", "-port", str(self.port),
            # toxicity draws come from this seed, so a schedule replays the same way
            "-seed", str(seed),
        ], self.wd / "toxiproxy.log")

    def start(self, timeout: float = 30.0) -> Toxiproxy:
        ensure_binaries(["toxiproxy"])
        self.process.start()
        self.process.wait_until(lambda: _http_ok(f"{self.url}/version"), "serving (/version)", timeout)
        return self

    def stop(self) -> None:
        self.process.stop()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise self.process.fail(f"{method} {path} answered {exc.code}: {exc.read()[:300]!r}") from exc
        return json.loads(raw) if raw.strip() else None

    def proxy(self, name: str, upstream: str) -> str:
        """Create a proxy to ``host:port`` on a free local port; returns its ``host:port``."""
        listen = f"127.0.0.1:{free_port()}"
        self._call("POST", "/proxies", {"name": name, "listen": listen, "upstream": upstream,
                                        "enabled": True})
        return listen

    def add_toxic(self, proxy: str, name: str, kind: str, stream: str = "downstream",
                  toxicity: float = 1.0, **attributes: Any) -> None:
        self._call("POST", f"/proxies/{proxy}/toxics", {
            "name": name, "type": kind, "stream": stream, "toxicity": toxicity,
            "attributes": attributes})

    def remove_toxic(self, proxy: str, name: str) -> None:
        self._call("DELETE", f"/proxies/{proxy}/toxics/{name}")

    def set_enabled(self, proxy: str, enabled: bool) -> None:
        self._call("POST", f"/proxies/{proxy}", {"enabled": enabled})

    def cut(self, proxy: str) -> None:
        """Close every open connection of ``proxy``; new ones are accepted again at once."""
        self.set_enabled(proxy, False)
        self.set_enabled(proxy, True)

    def reset(self) -> None:
        """Every proxy enabled, every toxic removed."""
        self._call("POST", "/reset")

    def proxies(self) -> dict[str, Any]:
        return dict(self._call("GET", "/proxies"))


@contextlib.contextmanager
def running(component: T) -> Iterator[T]:
    """``with running(S3Server()) as s3:`` start, yield, always stop."""
    try:
        yield component.start()  # type: ignore[attr-defined]
    finally:
        component.stop()  # type: ignore[attr-defined]
