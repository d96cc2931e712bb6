#!/usr/bin/env bash
# Build (once) and cache what a real Kubernetes v1.20.2 worker node needs for the tests in
# tests/kube (tests/kube/node.py): the kubelet, from the same Debian bookworm `kubernetes`
# source package as scripts/kube-control-plane.sh builds the control plane from, and the
# pod sandbox ("pause") image, compiled statically from that tree's build/pause/linux/pause.c
# and committed with buildah from scratch. It also installs Debian's containerd 1.6 and
# runc 1.1 (the container runtime the kubelet drives), the CNI plugins, buildah and
# debootstrap (scripts/build-images.sh uses the last two).
#
# Everything lands OUTSIDE the checkout, beside the control plane binaries:
#   ${EDGEFLEET_KUBE_CACHE:-/var/cache/edgefleet/kube-v1.20.2}/bin/kubelet
#   ${EDGEFLEET_KUBE_CACHE:-/var/cache/edgefleet/kube-v1.20.2}/images/pause-3.2.tar
# (a docker-archive named k8s.gcr.io/pause:3.2, for `ctr -n k8s.io images import`).
# When both are there and the kubelet answers --version, this script only checks the
# Debian packages and exits 0.
#
# Needs root (or passwordless sudo); runs non-interactively. A cold kubelet build takes
# about 9 minutes on 2 cores; its temporary tree (a few GB, under ${TMPDIR:-/tmp}) is
# removed afterwards, also when the build fails or is interrupted.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

KUBE_VERSION="v1.20.2"
PAUSE_IMAGE="k8s.gcr.io/pause:3.2"  # the kubelet's default --pod-infra-container-image
CACHE_DIR="${EDGEFLEET_KUBE_CACHE:-/var/cache/edgefleet/kube-v1.20.2}"
BIN_DIR="${CACHE_DIR}/bin"
IMAGE_DIR="${CACHE_DIR}/images"
PAUSE_TAR="${IMAGE_DIR}/pause-3.2.tar"
# Node runtime first; then what the kubelet and the pause image are built with.
NODE_PACKAGES=(containerd runc containernetworking-plugins buildah debootstrap iproute2 util-linux)
BUILD_PACKAGES=(golang-1.19-go rsync make dpkg-dev gcc libc6-dev golang-github-modern-go-reflect2-dev)
GO_ROOT="/usr/lib/go-1.19"
REFLECT2_SRC="/usr/share/gocode/src/github.com/modern-go/reflect2"

log() { printf '[kube-node] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

SUDO=""
if [[ "$(id -u)" -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
fi

apt_updated=0
apt_update() {
  if [[ "${apt_updated}" -eq 0 ]]; then
    log "apt-get update"
    ${SUDO} apt-get update -qq >&2
    apt_updated=1
  fi
}

apt_ensure() {
  local p missing=()
  for p in "$@"; do
    if ! dpkg-query -W -f='${Status}' "${p}" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("${p}")
    fi
  done
  if [[ "${#missing[@]}" -gt 0 ]]; then
    apt_update
    log "installing: ${missing[*]}"
    ${SUDO} apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >&2
  fi
}

cached_ok() {
  [[ -x "${BIN_DIR}/kubelet" && -s "${PAUSE_TAR}" ]] || return 1
  "${BIN_DIR}/kubelet" --version 2>/dev/null | grep -q "Kubernetes ${KUBE_VERSION}"
}

apt_ensure "${NODE_PACKAGES[@]}"
for tool in containerd containerd-shim-runc-v2 runc ctr buildah; do
  command -v "${tool}" >/dev/null 2>&1 || die "${tool} not found after installing the packages"
done

if cached_ok; then
  log "cached kubelet and pause image are present"
  echo "${BIN_DIR}"
  exit 0
fi

# One build at a time per cache directory; a second caller waits, then finds the cache.
${SUDO} mkdir -p "${BIN_DIR}" "${IMAGE_DIR}"
if command -v flock >/dev/null 2>&1 && [[ -z "${SUDO}" || -w "${CACHE_DIR}" ]]; then
  exec 9>"${CACHE_DIR}/.node-build.lock"
  flock 9
  if cached_ok; then
    log "another run built the kubelet meanwhile"
    echo "${BIN_DIR}"
    exit 0
  fi
fi

apt_ensure "${BUILD_PACKAGES[@]}"
[[ -x "${GO_ROOT}/bin/go" ]] || die "Go 1.19 not found at ${GO_ROOT}"
[[ -d "${REFLECT2_SRC}" ]] || die "reflect2 1.0.2 source not found at ${REFLECT2_SRC}"

# --- the deb-src entry for bookworm main (as scripts/kube-control-plane.sh writes it) ---
SRC_LIST="/etc/apt/sources.list.d/edgefleet-src.list"
has_bookworm_src() {
  grep -sE '^[[:space:]]*(deb-src[[:space:]].*[[:space:]]bookworm[[:space:]].*main|Types:.*deb-src)' \
    /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
    2>/dev/null | grep -q .
}
if ! has_bookworm_src; then
  # Reuse the mirror and Signed-By of the machine's own Debian `deb` entry (apt refuses
  # two entries for one mirror and suite that disagree on it).
  mirror="" keyring=""
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f "${f}" ]] || continue
    uri="$(awk '/^[[:space:]]*URIs:/ {print $2; exit}' "${f}")"
    if [[ "${uri}" =~ /debian/?$ ]]; then
      mirror="${uri}"
      keyring="$(awk '/^[[:space:]]*Signed-By:/ {print $2; exit}' "${f}")"
      break
    fi
  done
  if [[ -z "${mirror}" ]]; then
    line="$(grep -hsE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list \
        /etc/apt/sources.list.d/*.list 2>/dev/null | grep -E '/debian/?[[:space:]]' | head -n1 || true)"
    if [[ -n "${line}" ]]; then
      opts="$(sed -nE 's/^[^[]*\[([^]]*)\].*/\1/p' <<<"${line}")"
      keyring="$(tr ' ' '\n' <<<"${opts}" | sed -nE 's/^signed-by=//p' | head -n1)"
      mirror="$(sed -E 's/\[[^]]*\]//' <<<"${line}" | awk '{print $2}')"
    fi
  fi
  mirror="${mirror:-http://deb.debian.org/debian}"
  opts=""
  [[ -n "${keyring}" ]] && opts="[signed-by=${keyring}] "
  entry="deb-src ${opts}${mirror} bookworm main"
  log "writing ${SRC_LIST}: ${entry}"
  echo "${entry}" | ${SUDO} tee "${SRC_LIST}" >/dev/null
  apt_updated=0
fi
if ! apt-get source --print-uris -qq kubernetes </dev/null 2>/dev/null | grep -q '\.dsc'; then
  apt_update
fi

# --- fetch and build in a temporary tree --------------------------------------------------
BUILD_ROOT="$(mktemp -d "${TMPDIR:-/tmp}/edgefleet-kubelet-build.XXXXXX")"
BUILDAH_ROOT=""
cleanup() {
  rm -rf "${BUILD_ROOT}"
  if [[ -n "${BUILDAH_ROOT}" ]]; then
    ${SUDO} buildah --root "${BUILDAH_ROOT}/storage" --runroot "${BUILDAH_ROOT}/run" \
      rm --all >/dev/null 2>&1 || true
    ${SUDO} rm -rf "${BUILDAH_ROOT}" || true
  fi
  rm -f "${PAUSE_TAR}.new" "${BIN_DIR}/.kubelet.new"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

DL_DIR="${BUILD_ROOT}/dl"
mkdir -p "${DL_DIR}"
if [[ "$(id -u)" -eq 0 ]] && id _apt >/dev/null 2>&1; then
  chmod 0755 "${BUILD_ROOT}"
  chown _apt "${DL_DIR}"
fi
log "fetching the kubernetes source package into ${BUILD_ROOT}"
(cd "${DL_DIR}" && apt-get source -qq --download-only kubernetes </dev/null >&2)
dscs=("${DL_DIR}"/kubernetes_*.dsc)
[[ -f "${dscs[0]}" ]] || die "apt-get source did not download kubernetes"
dpkg-source --no-check -x "${dscs[0]}" "${BUILD_ROOT}/src-unpacked" >&2 \
  || die "dpkg-source failed to unpack ${dscs[0]}"
rm -rf "${DL_DIR}"

GOPATH_DIR="${BUILD_ROOT}/gopath"
KROOT="${GOPATH_DIR}/src/k8s.io/kubernetes"
mkdir -p "$(dirname "${KROOT}")"
mv "${BUILD_ROOT}/src-unpacked" "${KROOT}"
rm -f "${BUILD_ROOT}"/kubernetes_*

[[ -d "${KROOT}/vendor/github.com/modern-go/reflect2" ]] || die "vendored reflect2 not found"
log "replacing vendored github.com/modern-go/reflect2 with 1.0.2 (Go 1.19 fix)"
rm -rf "${KROOT}/vendor/github.com/modern-go/reflect2"
mkdir -p "${KROOT}/vendor/github.com/modern-go/reflect2"
cp -rL "${REFLECT2_SRC}/." "${KROOT}/vendor/github.com/modern-go/reflect2/"
rm -rf "${KROOT}/vendor/github.com/modern-go/reflect2/.git"
find "${KROOT}/vendor/github.com/modern-go/reflect2" -name '*_test.go' -delete

if ! { [[ -x "${BIN_DIR}/kubelet" ]] \
    && "${BIN_DIR}/kubelet" --version 2>/dev/null | grep -q "Kubernetes ${KUBE_VERSION}"; }; then
  log "building the kubelet (this takes several minutes)"
  start_ts="$(date +%s)"
  (
    cd "${KROOT}"
    export PATH="${GO_ROOT}/bin:${PATH}"
    export GOROOT="${GO_ROOT}"
    export GOPATH="${GOPATH_DIR}"
    export GO111MODULE=off GOPROXY=off GOFLAGS="" CGO_ENABLED=0
    export GOCACHE="${BUILD_ROOT}/gocache"
    export KUBE_GIT_VERSION="${KUBE_VERSION}" KUBE_GIT_TREE_STATE=clean
    export KUBE_VERBOSE=1
    make WHAT=cmd/kubelet </dev/null >&2
  )
  log "kubelet build took $(( $(date +%s) - start_ts ))s"
  built="$(find "${KROOT}/_output" -type f -name kubelet -perm -u+x | head -n1)"
  [[ -n "${built}" ]] || die "the build produced no kubelet"
  ${SUDO} install -m 0755 "${built}" "${BIN_DIR}/.kubelet.new"
  ${SUDO} mv -f "${BIN_DIR}/.kubelet.new" "${BIN_DIR}/kubelet"
fi

if [[ ! -s "${PAUSE_TAR}" ]]; then
  log "building ${PAUSE_IMAGE} from build/pause/linux/pause.c"
  pause_c="${KROOT}/build/pause/linux/pause.c"
  [[ -f "${pause_c}" ]] || die "${pause_c} not found in the source tree"
  gcc -Os -Wall -Werror -static -DVERSION=v3.2-edgefleet -o "${BUILD_ROOT}/pause" "${pause_c}"
  strip "${BUILD_ROOT}/pause"
  # A throw-away buildah store: nothing is left in /var/lib/containers.
  BUILDAH_ROOT="$(${SUDO} mktemp -d "${IMAGE_DIR}/.pause-build.XXXXXX")"
  bh=(${SUDO} buildah --root "${BUILDAH_ROOT}/storage" --runroot "${BUILDAH_ROOT}/run"
      --storage-driver vfs)
  ctr_id="$("${bh[@]}" from scratch)"
  "${bh[@]}" copy "${ctr_id}" "${BUILD_ROOT}/pause" /pause >/dev/null
  "${bh[@]}" config --entrypoint '["/pause"]' --user 65535:65535 "${ctr_id}"
  "${bh[@]}" commit --quiet "${ctr_id}" "${PAUSE_IMAGE}" >/dev/null
  ${SUDO} rm -f "${PAUSE_TAR}.new"
  "${bh[@]}" push --quiet "${PAUSE_IMAGE}" "docker-archive:${PAUSE_TAR}.new:${PAUSE_IMAGE}" >&2
  ${SUDO} mv -f "${PAUSE_TAR}.new" "${PAUSE_TAR}"
fi

cached_ok || die "the cached kubelet in ${BIN_DIR} does not run, or the pause image is missing"
log "kubelet cached in ${BIN_DIR}, pause image in ${PAUSE_TAR}"
echo "${BIN_DIR}"
