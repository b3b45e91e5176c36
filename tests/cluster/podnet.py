"""The real node's pod network services: cluster DNS and the `kubernetes` Service.

A cluster normally gives pods two things through Services: DNS (CoreDNS as a Deployment behind
the ClusterIP 10.0.0.10 or so) and the API server (the `kubernetes` Service, ClusterIP 10.0.0.1
port 443, which the in-cluster config dials). Both ClusterIPs work only because kube-proxy
programs iptables or IPVS rules on every node. A real kube-proxy here would program host-wide
chains (KUBE-SERVICES...) that every session sharing this machine would fight over, so none
runs, and these are the stand-ins, both per node:

* **CoreDNS runs as a host process**, not as a Deployment behind a ClusterIP: it listens on the
  node's bridge gateway address (the first host of the node's /24), which pods reach without
  any rule, and the kubelet's ``clusterDNS`` names that address. The server is real CoreDNS
  with the real ``kubernetes`` plugin, reading Services and EndpointSlices from the API server.
* **One DNAT rule stands in for kube-proxy's rule for the `kubernetes` Service**: traffic that
  enters from this node's bridge for 10.0.0.1:443 goes to the API server's host address and
  port. It lives in an nftables table of the node's own (``ip cpt<id>``), added at node start
  and deleted whole at stop, so it never edits a chain another session uses.

What this hides: no other Service has a working ClusterIP (DNS answers with it, but nothing
routes it); pods must use headless Services (pod IPs) or the host's address.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

from .cluster import KubeCluster, Process, binary, free_port, http_get, run

CLUSTER_DOMAIN = "cluster.local"
DNS_PORT = 53
TABLE_PREFIX = "cpt"  # nftables tables are named like the node's bridge: cpt<id>

# What CoreDNS's kubernetes plugin reads, as the upstream system:coredns ClusterRole grants it
# (no pods: the Corefile leaves pod records off).
COREDNS_RULES: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["services", "namespaces"], "verbs": ["list", "watch"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
]


def gateway(subnet: ipaddress.IPv4Network) -> str:
    """The bridge's own address: the pods' default gateway and their DNS server."""
    return str(next(subnet.hosts()))


def corefile(*, listen: str, kubeconfig: str, ready_port: int, health_port: int,
             domain: str = CLUSTER_DOMAIN, upstream: str = "/etc/resolv.conf") -> str:
    """A Corefile like the one kubeadm installs, but bound to ``listen`` only (every node on this
    machine runs its own CoreDNS on port 53) and with its health and readiness ports on
    loopback (their defaults, :8080 and :8181, would collide across nodes).

    ``kubernetes`` serves Service A records, headless Services' endpoints by pod hostname
    (``<hostname>.<subdomain>.<ns>.svc.<domain>``, what an Indexed Job's pods get) and reverse
    lookups of those; every other name goes to the host's resolvers.
    """
    try:
        ipaddress.IPv4Address(listen)
    except ValueError:
        raise ValueError(f"CoreDNS listen address {listen!r} is not an IPv4 address") from None
    return f""".:{DNS_PORT} {{
    bind {listen}
    errors
    log
    health 127.0.0.1:{health_port}
    ready 127.0.0.1:{ready_port}
    kubernetes {domain} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} cpt-test
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    cache 5
    forward . {upstream}
}}
"""


def service_dnat(*, table: str, bridge: str, service: tuple[str, int],
                 target: tuple[str, int]) -> str:
    """An nft script: a table of the node's own with one DNAT rule, for connections that come
    in from ``bridge`` to ``service`` (the `kubernetes` ClusterIP and port), sent to ``target``
    (the API server on a host address). The target must be a host address, not 127.0.0.1:
    the kernel drops packets from outside rewritten to loopback (route_localnet is off).
    Pods reach local addresses without IP forwarding, so no sysctl is touched."""
    for what, (address, port) in (("service", service), ("target", target)):
        try:  # a clear error before nft sees it
            ipaddress.IPv4Address(address)
        except ValueError:
            raise ValueError(f"DNAT {what} {address!r} is not an IPv4 address") from None
        if not 0 < port < 65536:
            raise ValueError(f"bad port {port} for the DNAT {what} {address}")
    if ipaddress.ip_address(target[0]).is_loopback:
        raise ValueError(f"DNAT target {target[0]} is loopback; pods cannot be sent there")
    return f"""table ip {table} {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "{bridge}" ip daddr {service[0]} tcp dport {service[1]} dnat to {target[0]}:{target[1]}
    }}
}}
"""


def stale_tables(nft_tables_json: str, links: set[str]) -> list[str]:
    """Tables ``cpt<id>`` (family ip) left by a node whose bridge is gone (a killed session):
    a node creates its bridge before its table and deletes the table first, so a table without
    its bridge is a leftover."""
    found = []
    for item in json.loads(nft_tables_json or "{}").get("nftables", []):
        table = item.get("table")
        if table and table.get("family") == "ip" and table["name"].startswith(TABLE_PREFIX) \
                and table["name"] not in links:
            found.append(table["name"])
    return found



# -- on the host ----------------------------------------------------------------------
def host_links() -> set[str]:
    return {link["ifname"] for link in json.loads(run(["ip", "-json", "link", "show"]).stdout or "[]")}



def make_bridge(bridge: str, subnet: ipaddress.IPv4Network) -> None:
    """The node's bridge with its gateway address, before CoreDNS binds that address (the CNI
    bridge plugin takes an existing bridge as it is and finds its gateway address there)."""
    run(["ip", "link", "add", "name", bridge, "type", "bridge"])
    run(["ip", "addr", "add", f"{gateway(subnet)}/{subnet.prefixlen}", "dev", bridge])
    run(["ip", "link", "set", bridge, "up"])


def route_kubernetes_service(table: str, bridge: str, service: tuple[str, int],
                             target: tuple[str, int]) -> None:
    """Install the node's DNAT for the `kubernetes` Service (see the module docstring), after
    dropping the tables of nodes killed before they could delete theirs."""
    nft = binary("nft")
    listed = run([nft, "-j", "list", "tables", "ip"]).stdout
    for old in stale_tables(listed, host_links()):
        run([nft, "delete", "table", "ip", old], check=False)
    run([nft, "-f", "-"], input=service_dnat(table=table, bridge=bridge, service=service, target=target))


def remove_table(table: str) -> None:
    run([binary("nft"), "delete", "table", "ip", table], check=False)


class ClusterDNS:
    """CoreDNS for one node, as a host process bound to the node's gateway address, reading the
    cluster through a client certificate of its own limited to ``COREDNS_RULES``."""

    def __init__(self, kube: KubeCluster, root: Path, listen: str) -> None:
        self.kube, self.root, self.listen = kube, root, listen
        self.root.mkdir(parents=True, exist_ok=True)
        self.ready_port, self.health_port = free_port(), free_port()
        self.process: Process | None = None

    def start(self, timeout: float = 60.0) -> ClusterDNS:
        kubeconfig = self.kube.user_kubeconfig("coredns", "system:coredns", COREDNS_RULES)
        conf = self.root / "Corefile"
        conf.write_text(corefile(listen=self.listen, kubeconfig=str(kubeconfig),
                                 ready_port=self.ready_port, health_port=self.health_port))
        self.process = Process("coredns", [binary("coredns"), "-conf", conf], self.root / "coredns.log",
                               cwd=self.root).start()
        # ready: the kubernetes plugin has listed Services and EndpointSlices once.
        self.process.wait_until(
            lambda: http_get(f"http://127.0.0.1:{self.ready_port}/ready")[0] == 200,
            f"ready (serving {self.listen}:{DNS_PORT})", timeout)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
