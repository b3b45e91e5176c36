#!/usr/bin/env bash
# Builds (or installs) every binary the e2e test cluster needs, into
#   ${CPT_CACHE_DIR:-$HOME/.cache/cpt-operator}/bin/<component>-<version>/
#
# Idempotent: a component whose binaries are all present is reused as is, so
# a warm run takes seconds. Go module and build caches live under the same
# cache dir (gomod/, gocache/) while building and are emptied after a build
# that compiled something: about 10 GB that the images and the test run need
# more (CPT_KEEP_GO_CACHE=1 keeps them, for a session that rebuilds often).
# Each component is built into a temporary dir and moved into place when
# complete, so an interrupted build never leaves a half-filled dir.
#
# Usage: build.sh [--force] [component ...]
#   components: kubernetes etcd kwok helm versitygw toxiproxy prometheus kueue
#               kubelet containerd runc cni pause coredns nftables (the real node; `node`
#               names all seven)
#               (default: all)
#   --force      rebuild even when the binaries are present
# Environment: CPT_CACHE_DIR, GO (go binary), BUILD_PARALLELISM (go build -p, default 2),
#   CPT_KEEP_GO_CACHE (1: keep gomod/ and gocache/ after a build)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

cache=${CPT_CACHE_DIR:-$HOME/.cache/cpt-operator}
bin_root=$cache/bin
log_dir=$cache/logs
go=${GO:-go}
parallelism=${BUILD_PARALLELISM:-2}
mkdir -p "$bin_root" "$log_dir"

export GOMODCACHE=$cache/gomod
export GOCACHE=$cache/gocache
export CGO_ENABLED=0
# Never fetch another Go toolchain behind our back: the versions above are
# chosen to build with the installed one (Kubernetes 1.36 needs Go >= 1.26).
export GOTOOLCHAIN=local

force=0
selected=()
for arg in "$@"; do
  case $arg in
    --force) force=1 ;;
    -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
    kubernetes | etcd | kwok | helm | versitygw | toxiproxy | prometheus | kueue) selected+=("$arg") ;;
    kubelet | containerd | runc | cni | pause | coredns | nftables) selected+=("$arg") ;;
    node) selected+=(kubelet containerd runc cni pause coredns nftables) ;;
    *) echo "build.sh: unknown component '$arg'" >&2; exit 2 ;;
  esac
done
# kubelet after kubernetes: it reuses most of the control plane's compiled packages.
[[ ${#selected[@]} -gt 0 ]] || selected=(kubernetes etcd kwok helm versitygw toxiproxy prometheus kueue
  kubelet containerd runc cni pause coredns nftables)

say() { printf '[build.sh %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# have DIR NAME... : true when every NAME is an executable file in DIR.
have() {
  local dir=$1; shift
  local name
  for name in "$@"; do [[ -x $dir/$name ]] || return 1; done
}

failed=()
built=0

# component NAME VERSION BUILD_FUNCTION BINARY...
# Runs BUILD_FUNCTION TMPDIR unless the binaries are cached, times it, and
# moves TMPDIR into place on success.
component() {
  local name=$1 version=$2 fn=$3; shift 3
  local dir=$bin_root/$name-$version
  local log=$log_dir/$name-$version.log
  if [[ $force == 0 ]] && have "$dir" "$@"; then
    say "$name $version: cached in $dir"
    return 0
  fi
  local tmp=$dir.tmp.$$
  rm -rf "$tmp"
  mkdir -p "$tmp"
  say "$name $version: building $* (log: $log)"
  local start=$SECONDS
  # A subshell, so that cd and errexit in the build function stay in there.
  if (set -e; "$fn" "$tmp") >"$log" 2>&1 && have "$tmp" "$@"; then
    rm -rf "$dir"
    mv "$tmp" "$dir"
    built=1
    say "$name $version: done in $((SECONDS - start)) s -> $dir"
  else
    say "$name $version: FAILED after $((SECONDS - start)) s; last lines of $log:"
    tail -n 25 "$log" | sed 's/^/    /'
    rm -rf "$tmp"
    failed+=("$name")
  fi
}

# --- Kubernetes control plane and kubectl -----------------------------------
# k8s.io/kubernetes cannot be `go install`ed (its go.mod replaces the staging
# modules with local paths); tools/k8s/go.mod repeats those replace lines
# against the published tags (regenerate with tools/k8s/gen.sh on a bump).
# k8s_build OUT CMD... : Kubernetes commands from the tools module, with the version ldflags.
k8s_build() {
  local out=$1 minor=${KUBERNETES_VERSION#v1.}
  shift
  minor=${minor%%.*}
  local ldflags="-s -w" pkg
  # Without these the binaries report v0.0.0 and clients (kubectl, helm)
  # refuse or warn about version skew.
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  cd "$here/tools/k8s"
  GOFLAGS=-mod=readonly "$go" build -p "$parallelism" -trimpath -ldflags "$ldflags" -o "$out/" \
    "${@/#/k8s.io/kubernetes/cmd/}"
}
build_kubernetes() { k8s_build "$1" kube-apiserver kube-controller-manager kube-scheduler kubectl; }
# The kubelet of the real node: the same version and ldflags as the control plane, but cached
# apart so that adding it does not rebuild the control plane.
build_kubelet() { k8s_build "$1" kubelet; }

# --- etcd: a tools module of its own (Debian's 3.4.23 lacks RequestWatchProgress)
build_etcd() {
  local out=$1
  cd "$here/tools/etcd"
  GOFLAGS=-mod=readonly "$go" build -p "$parallelism" -trimpath \
    -ldflags "-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3
}

# go_install OUT MODULE_PATH@VERSION: modules without replace lines install
# straight from the proxy, checked against their own go.sum.
go_install() {
  GOBIN=$1 "$go" install -p "$parallelism" -trimpath -ldflags "-s -w" "$2"
}
build_kwok() { go_install "$1" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"; }
build_helm() {
  # helm prints its version from ldflags too.
  GOBIN=$1 "$go" install -p "$parallelism" -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}
# S3: versitygw rather than minio: about a third of minio's dependencies
# (81 vs 261 modules in go.mod), tagged releases (minio is source-only
# pseudo-versions now), and a plain `posix DIR` backend for a temp dir.
build_versitygw() { go_install "$1" "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION"; }
# Fault injection (tests/faults): a TCP proxy whose faults (latency, resets, timeouts) are set
# per connection direction through its HTTP API. The main package is cmd/server, so `go install`
# names the binary `server`; it is renamed to what it is.
build_toxiproxy() {
  go_install "$1" "github.com/Shopify/toxiproxy/v2/cmd/server@$TOXIPROXY_VERSION"
  mv "$1/server" "$1/toxiproxy-server"
}
# Gang admission (quotas, all-or-nothing, preemption): the Kueue controller manager. Its CRDs
# and webhook manifests are copied from the same module beside the binary, so that a CI cache of
# bin/ alone is enough for tests/cluster/kueue.py.
build_kueue() {
  go_install "$1" "sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION"
  local module=$GOMODCACHE/sigs.k8s.io/kueue@$KUEUE_VERSION/config/components
  mkdir -p "$1/crds"
  cp "$module"/crd/bases/*.yaml "$1/crds/"
  cp "$module/webhook/manifests.yaml" "$1/webhooks.yaml"
  chmod -R u+w "$1"
}

# --- The real node's container runtime ---------------------------------------
# containerd 2.x from its Go module. Without cgo the btrfs snapshotter is left
# out (overlayfs and native remain); the version ldflag is what `ctr version`
# and the CRI report to the kubelet.
build_containerd() {
  GOBIN=$1 "$go" install -p "$parallelism" -trimpath \
    -ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION"
}
# CNI plugins for the pod network: a bridge with host-local addresses, the
# loopback in each pod and hostPort mappings.
build_cni() {
  local m=github.com/containernetworking/plugins/plugins p
  local pkgs=()
  for p in main/bridge main/loopback ipam/host-local meta/portmap; do pkgs+=("$m/$p@$CNI_PLUGINS_VERSION"); done
  GOBIN=$1 "$go" install -p "$parallelism" -trimpath -ldflags "-s -w" "${pkgs[@]}"
}

# The real node's cluster DNS: CoreDNS with only the plugins it uses (tools/coredns/main.go sets
# dnsserver.Directives, as CoreDNS documents for custom builds), from a tools module of its own.
build_coredns() {
  cd "$here/tools/coredns"
  GOFLAGS=-mod=readonly "$go" build -p "$parallelism" -trimpath -ldflags "-s -w" -o "$1/coredns" .
  "$1/coredns" -version
}

# apt_install PACKAGE... : installs Debian packages (root or sudo) unless their
# commands are already there (the caller checks), retrying after an update.
apt_install() {
  local sudo=""
  [[ $(id -u) == 0 ]] || sudo=sudo
  command -v apt-get >/dev/null || { echo "no apt-get: install $* yourself"; return 1; }
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "$@" || {
    $sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q \
      --no-install-recommends "$@"
  }
}
# runc from Debian: its Go module needs cgo and libseccomp headers (nsexec is C).
build_runc() {
  command -v runc >/dev/null || apt_install runc
  ln -s "$(command -v runc)" "$1/runc"
  runc --version
}

# nft from Debian: the node's stand-in for kube-proxy's rule for the `kubernetes` Service is a
# DNAT in an nftables table of the node's own (node.py), so it never edits shared chains.
build_nftables() {
  command -v nft >/dev/null || apt_install nftables
  ln -s "$(command -v nft)" "$1/nft"
  "$1/nft" --version
}

# The pod sandbox's pause program, from the C source in the Kubernetes module
# (what registry.k8s.io/pause is built from), linked statically as upstream
# does; the node fixture puts it in an image, so no registry is needed.
build_pause() {
  command -v gcc >/dev/null && [[ -e /usr/lib/x86_64-linux-gnu/libc.a ]] || apt_install gcc libc6-dev
  local src
  src=$(cd "$here/tools/k8s" && "$go" list -m -f '{{.Dir}}' k8s.io/kubernetes)
  [[ -n $src && -d $src ]] || src=$(cd "$here/tools/k8s" && GOFLAGS=-mod=mod "$go" mod download -json k8s.io/kubernetes |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  gcc -Os -Wall -Werror -static "-DVERSION=v$PAUSE_VERSION" -o "$1/pause" "$src/build/pause/linux/pause.c"
  "$1/pause" -v
}

# --- Prometheus and Alertmanager from Debian ---------------------------------
# Built from Go modules Prometheus has no web UI and needs exclude/replace
# lines; Debian's packages are fine. The tests start their own instances, so
# the packaged services are stopped and disabled. The cache dir gets symlinks
# so that every component is found the same way.
build_prometheus() {
  local out=$1 sudo=""
  if ! command -v prometheus >/dev/null || ! command -v prometheus-alertmanager >/dev/null; then
    [[ $(id -u) == 0 ]] || sudo=sudo
    command -v apt-get >/dev/null || { echo "no apt-get: install prometheus and prometheus-alertmanager yourself"; return 1; }
    # policy-rc.d 101: do not start the packaged daemons during the install.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then
      printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
      $sudo chmod +x "$policy"
      made_policy=1
    fi
    local rc=0
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends \
      prometheus prometheus-alertmanager || {
      $sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q \
        --no-install-recommends prometheus prometheus-alertmanager
    } || rc=$?
    [[ $made_policy == 0 ]] || $sudo rm -f "$policy"
    [[ $rc == 0 ]] || return $rc
  fi
  if [[ -d /run/systemd/system ]]; then
    $sudo systemctl disable --now prometheus prometheus-alertmanager prometheus-node-exporter 2>/dev/null || true
  fi
  ln -s "$(command -v prometheus)" "$out/prometheus"
  ln -s "$(command -v promtool)" "$out/promtool"
  ln -s "$(command -v prometheus-alertmanager)" "$out/alertmanager"
  ln -s "$(command -v amtool)" "$out/amtool"
  prometheus --version
}

command -v "$go" >/dev/null || { echo "build.sh: go not found (need Go >= 1.26)" >&2; exit 1; }
say "cache: $cache ($("$go" version))"
total_start=$SECONDS
for c in "${selected[@]}"; do
  case $c in
    kubernetes) component kubernetes "$KUBERNETES_VERSION" build_kubernetes \
      kube-apiserver kube-controller-manager kube-scheduler kubectl ;;
    etcd) component etcd "$ETCD_VERSION" build_etcd etcd ;;
    kwok) component kwok "$KWOK_VERSION" build_kwok kwok ;;
    helm) component helm "$HELM_VERSION" build_helm helm ;;
    versitygw) component versitygw "$VERSITYGW_VERSION" build_versitygw versitygw ;;
    toxiproxy) component toxiproxy "$TOXIPROXY_VERSION" build_toxiproxy toxiproxy-server ;;
    kueue) component kueue "$KUEUE_VERSION" build_kueue kueue crds ;;
    prometheus) component prometheus "$PROMETHEUS_VERSION" build_prometheus \
      prometheus promtool alertmanager amtool ;;
    kubelet) component kubelet "$KUBERNETES_VERSION" build_kubelet kubelet ;;
    containerd) component containerd "$CONTAINERD_VERSION" build_containerd \
      containerd containerd-shim-runc-v2 ctr ;;
    runc) component runc "$RUNC_VERSION" build_runc runc ;;
    pause) component pause "$PAUSE_VERSION" build_pause pause ;;
    cni) component cni "$CNI_PLUGINS_VERSION" build_cni bridge loopback host-local portmap ;;
    coredns) component coredns "$COREDNS_VERSION" build_coredns coredns ;;
    nftables) component nftables "$NFTABLES_VERSION" build_nftables nft ;;
  esac
done
if [[ $built == 1 && ${CPT_KEEP_GO_CACHE:-0} != 1 ]]; then
  say "emptying the Go caches ($(du -sh "$GOCACHE" "$GOMODCACHE" 2>/dev/null | cut -f1 | paste -sd+)); CPT_KEEP_GO_CACHE=1 keeps them"
  "$go" clean -cache -modcache || true
fi
if [[ ${#failed[@]} -gt 0 ]]; then
  say "FAILED: ${failed[*]} (see $log_dir)"
  exit 1
fi
say "all done in $((SECONDS - total_start)) s"
