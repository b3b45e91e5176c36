#!/usr/bin/env bash
# Builds the images the real node runs, with no registry and no daemon, into OCI archives:
#   ${CPT_CACHE_DIR:-$HOME/.cache/cpt-operator}/images/<name>-<tag>.<oci|docker>.tar
# each holding the image localhost/cpt-<name>:<tag> (pause: localhost/pause:<version>), which
# tests/cluster/node.py imports into the node's containerd.
#
#   pause     the pod sandbox: the pause binary from build.sh, alone in an image
#   base      Debian bookworm from Debian's packages (mmdebstrap, minbase + python3-venv):
#             what python:3.11-slim-bookworm gives the Dockerfiles, made here
#   operator  operator/Dockerfile built FROM base (its PYTHON_IMAGE build argument); pip
#             downloads from PyPI
#   trainer   trainer/Dockerfile built FROM base the same way: torch with its CUDA libraries
#
# The tag is a hash of what goes in, so an archive present is up to date; --force rebuilds.
# Builder: buildah (Debian), overlay storage under the cache dir ($BUILDAH_STORAGE_DRIVER),
# run as root.
# Usage: images.sh [--force] [pause|base|operator|trainer ...]   (default: pause base)
# Prints "NAME REF ARCHIVE" per image on stdout, progress on stderr.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${CPT_CACHE_DIR:-$HOME/.cache/cpt-operator}
out_dir=$cache/images
log_dir=$cache/logs
mkdir -p "$out_dir" "$log_dir"

# Debian packages of the base image; python-is-python3 gives the `python` the Dockerfiles call.
BASE_PACKAGES="ca-certificates python3 python3-venv python-is-python3"
BASE_SUITE=bookworm

force=0
selected=()
for arg in "$@"; do
  case $arg in
    --force) force=1 ;;
    -h | --help) sed -n '2,18p' "$0"; exit 0 ;;
    pause | base | operator | trainer) selected+=("$arg") ;;
    *) echo "images.sh: unknown image '$arg'" >&2; exit 2 ;;
  esac
done
[[ ${#selected[@]} -gt 0 ]] || selected=(pause base)

# Progress on stderr; stdout gets one line per image, "NAME REF ARCHIVE", for node.py.
say() { printf '[images.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

need() {  # need COMMAND PACKAGE: apt-get install PACKAGE when COMMAND is missing
  command -v "$1" >/dev/null && return 0
  local sudo=""
  [[ $(id -u) == 0 ]] || sudo=sudo
  # Waits for a dpkg lock held by another install (build.sh may be installing at the same time).
  local apt=(apt-get -o DPkg::Lock::Timeout=600 -y -q --no-install-recommends)
  DEBIAN_FRONTEND=noninteractive $sudo "${apt[@]}" install "$2" || {
    $sudo "${apt[@]}" update && DEBIAN_FRONTEND=noninteractive $sudo "${apt[@]}" install "$2"
  }
}

# overlay (root, kernel overlayfs) shares layers; vfs copies each whole and was 2x slower.
driver=${BUILDAH_STORAGE_DRIVER:-overlay}
buildah_() {
  buildah --root "$cache/buildah-$driver/root" --runroot "$cache/buildah-$driver/run" \
    --storage-driver "$driver" "$@"
}

tag_of() {  # a short hash of its arguments
  printf '%s\n' "$@" | sha256sum | cut -c1-12
}

# image NAME REF BUILD_FUNCTION [FORMAT]: BUILD_FUNCTION REF commits REF into buildah's storage;
# the archive is written next to the others and renamed into place when complete. FORMAT `oci`
# (default): an OCI archive with gzipped layers. `docker`: a docker-archive, whose layers are
# stored uncompressed: for GBs of layers, gzip on push and gunzip on import cost more than the
# bytes (buildah's --disable-compression does not apply to oci-archive).
image() {
  local name=$1 ref=$2 fn=$3 format=${4:-oci}
  local archive=$out_dir/$name-${ref##*:}.$format.tar log=$log_dir/image-$name.log
  if [[ $force == 0 && -s $archive ]]; then
    say "$name: cached ($archive)"
    echo "$name $ref $archive"
    return 0
  fi
  say "$name: building $ref (log: $log)"
  local start=$SECONDS
  if ("$fn" "$ref" && rm -f "$archive.tmp" &&
      buildah_ push -q "$ref" "$format-archive:$archive.tmp:$ref") >"$log" 2>&1; then
    mv "$archive.tmp" "$archive"
    # Older archives of this image are stale by construction (the tag hashes the inputs).
    find "$out_dir" -maxdepth 1 -name "$name-*.tar" ! -path "$archive" -delete
    prune "$ref" >>"$log" 2>&1 || say "$name: pruning older builds failed (see $log)"
    say "$name: done in $((SECONDS - start)) s -> $archive ($(du -h "$archive" | cut -f1))"
    echo "$name $ref $archive"
  else
    say "$name: FAILED after $((SECONDS - start)) s; last lines of $log:"
    tail -n 25 "$log" | sed 's/^/    /'
    rm -f "$archive.tmp"
    return 1
  fi
}

# prune REF: older builds of REF's image leave buildah's storage, with the untagged layer images
# only they used. A trainer build whose dependencies changed holds a layer of its own of 6 GB,
# so without this the storage grows by that much per pyproject.toml change; REF's own layers
# stay as the next build's cache (untagged images with children are not dangling).
prune() {
  local ref=$1 old
  for old in $(buildah_ images --format '{{.Name}}:{{.Tag}}' | grep -F "${ref%:*}:" | grep -vxF "$ref"); do
    buildah_ rmi "$old"
  done
  # Removing an image can leave its parent dangling: repeat while there are any.
  for _ in $(seq 30); do
    [[ -n $(buildah_ images -q --filter dangling=true) ]] || break
    buildah_ rmi --prune >/dev/null
  done
}

build_pause() {
  local ref=$1 c
  c=$(buildah_ from scratch)
  buildah_ copy "$c" "$cache/bin/pause-$PAUSE_VERSION/pause" /pause
  # As registry.k8s.io/pause: the nobody user, the binary as entrypoint.
  buildah_ config --entrypoint '["/pause"]' --user 65535:65535 "$c"
  buildah_ commit -q --rm "$c" "$ref"
}

build_base() {
  local ref=$1 c tarball
  tarball=$(mktemp -d)/rootfs.tar
  mmdebstrap --variant=minbase --include="${BASE_PACKAGES// /,}" \
    --aptopt='Acquire::Retries "3"' "$BASE_SUITE" "$tarball"
  c=$(buildah_ from scratch)
  buildah_ add "$c" "$tarball" /
  rm -rf "$(dirname "$tarball")"
  buildah_ config --cmd '["/bin/bash"]' --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 "$c"
  buildah_ commit -q --rm "$c" "$ref"
}

repo=$(cd "$here/../.." && pwd)
# What a Dockerfile's COPY lines read: the tag changes exactly when one of these does.
source_tag() {
  (cd "$repo" && find "$@" pyproject.toml README.md api/cpt_api operator/cpt_operator trainer/cpt_trainer \
      -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum) |
    sha256sum | cut -c1-12
}

# build_dockerfile DOCKERFILE BASE_ARG REF: the project's Dockerfile as a user would build
# it, with the base image argument pointed at the local base. Build containers use the host
# network (no CNI needed for builds) and the host's CA bundle, which may hold a proxy's CA.
build_dockerfile() {
  local dockerfile=$1 arg=$2 ref=$3
  local base_ref base_archive
  # A RUN step needs an OCI runtime, which buildah only recommends.
  need runc runc
  read -r _ base_ref base_archive < <(bash "$here/images.sh" base | awk '$1 == "base"')
  [[ -n $base_ref ]]
  # FROM must find it in the storage (which may have been wiped), or buildah asks a registry.
  buildah_ inspect "$base_ref" >/dev/null 2>&1 || buildah_ pull -q "oci-archive:$base_archive"
  local volumes=()
  [[ -r /etc/ssl/certs/ca-certificates.crt ]] &&
    volumes+=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
  (cd "$repo" && buildah_ bud --layers --network host "${volumes[@]}" \
    --build-arg "$arg=$base_ref" -f "$dockerfile" -t "$ref" .)
}
build_operator() { build_dockerfile operator/Dockerfile PYTHON_IMAGE "$1"; }
build_trainer() { build_dockerfile trainer/Dockerfile PYTHON_IMAGE "$1"; }

need buildah buildah
rc=0
for i in "${selected[@]}"; do
  case $i in
    pause)
      [[ -x $cache/bin/pause-$PAUSE_VERSION/pause ]] || bash "$here/build.sh" pause >&2
      image pause "localhost/pause:$PAUSE_VERSION" build_pause || rc=1 ;;
    base)
      need mmdebstrap mmdebstrap
      image base "localhost/cpt-base:$BASE_SUITE-$(tag_of "$BASE_SUITE" "$BASE_PACKAGES" "$(declare -f build_base)")" \
        build_base || rc=1 ;;
    operator)
      image operator "localhost/cpt-operator:$(source_tag operator/Dockerfile)" build_operator || rc=1 ;;
    trainer)
      image trainer "localhost/cpt-trainer:$(source_tag trainer/Dockerfile)" build_trainer docker || rc=1 ;;
  esac
done
exit $rc
