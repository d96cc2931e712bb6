#!/usr/bin/env bash
# Build (once) and cache a real Kubernetes v1.20.2 control plane for the integration tests
# in tests/kube: kube-apiserver, kube-controller-manager and kube-scheduler from Debian
# bookworm's `kubernetes` source package, plus etcd from Debian's etcd-server package.
#
# The binaries land OUTSIDE the checkout, in
#   ${EDGEFLEET_KUBE_CACHE:-/var/cache/edgefleet/kube-v1.20.2}/bin/
# When they are already there and answer --version, this script does nothing and exits 0.
#
# Needs root (or passwordless sudo) for apt-get; runs non-interactively. A cold build takes
# about 7 minutes on 2 cores; its temporary tree (a few GB, under ${TMPDIR:-/tmp}) is removed
# afterwards, also when the build fails or is interrupted.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

KUBE_VERSION="v1.20.2"
CACHE_DIR="${EDGEFLEET_KUBE_CACHE:-/var/cache/edgefleet/kube-v1.20.2}"
BIN_DIR="${CACHE_DIR}/bin"
COMPONENTS=(kube-apiserver kube-controller-manager kube-scheduler)
APT_PACKAGES=(golang-1.19-go etcd-server rsync make dpkg-dev golang-github-modern-go-reflect2-dev)
GO_ROOT="/usr/lib/go-1.19"
REFLECT2_SRC="/usr/share/gocode/src/github.com/modern-go/reflect2"

log() { printf '[kube-control-plane] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

SUDO=""
if [[ "$(id -u)" -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
fi

cached_ok() {
  local c
  for c in "${COMPONENTS[@]}" etcd; do
    [[ -x "${BIN_DIR}/${c}" ]] || return 1
  done
  for c in "${COMPONENTS[@]}"; do
    "${BIN_DIR}/${c}" --version 2>/dev/null | grep -q "Kubernetes ${KUBE_VERSION}" || return 1
  done
  "${BIN_DIR}/etcd" --version >/dev/null 2>&1 || return 1
}

if cached_ok; then
  log "cached binaries are present and run"
  echo "${BIN_DIR}"
  exit 0
fi

# One build at a time per cache directory; a second caller waits, then finds the cache.
${SUDO} mkdir -p "${CACHE_DIR}"
if command -v flock >/dev/null 2>&1 && [[ -z "${SUDO}" || -w "${CACHE_DIR}" ]]; then
  exec 9>"${CACHE_DIR}/.build.lock"
  flock 9
  if cached_ok; then
    log "another run built the binaries meanwhile"
    echo "${BIN_DIR}"
    exit 0
  fi
fi

# --- apt: toolchain, etcd and the deb-src entry for bookworm main ------------------------
apt_updated=0
apt_update() {
  if [[ "${apt_updated}" -eq 0 ]]; then
    log "apt-get update"
    ${SUDO} apt-get update -qq >&2
    apt_updated=1
  fi
}

missing=()
for p in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "${p}" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("${p}")
  fi
done
if [[ "${#missing[@]}" -gt 0 ]]; then
  apt_update
  log "installing: ${missing[*]}"
  ${SUDO} apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >&2
fi

[[ -x "${GO_ROOT}/bin/go" ]] || die "Go 1.19 not found at ${GO_ROOT}"
ETCD_BIN="$(command -v etcd || true)"
[[ -n "${ETCD_BIN}" ]] || die "etcd not found after installing etcd-server"
[[ -d "${REFLECT2_SRC}" ]] || die "reflect2 1.0.2 source not found at ${REFLECT2_SRC}"

SRC_LIST="/etc/apt/sources.list.d/edgefleet-src.list"
has_bookworm_src() {
  # Another deb-src entry (one-line .list or deb822 .sources) for the machine's mirror.
  grep -sE '^[[:space:]]*(deb-src[[:space:]].*[[:space:]]bookworm[[:space:]].*main|Types:.*deb-src)' \
    /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
    2>/dev/null | grep -v "^${SRC_LIST}:" | grep -q .
}

if ! has_bookworm_src; then
  # Reuse the mirror (and its Signed-By: apt refuses two entries for one mirror and suite
  # that disagree on it) of the machine's own Debian `deb` entry.
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
  if [[ "$(cat "${SRC_LIST}" 2>/dev/null || true)" != "${entry}" ]]; then
    log "writing ${SRC_LIST}: ${entry}"
    echo "${entry}" | ${SUDO} tee "${SRC_LIST}" >/dev/null
    apt_updated=0
  fi
fi
# Update the package lists only when they cannot resolve the source package yet.
if ! apt-get source --print-uris -qq kubernetes </dev/null 2>/dev/null | grep -q '\.dsc'; then
  apt_update
fi

# --- fetch and build in a temporary tree --------------------------------------------------
STAGE=""
BUILD_ROOT="$(mktemp -d "${TMPDIR:-/tmp}/edgefleet-kube-build.XXXXXX")"
cleanup() {
  rm -rf "${BUILD_ROOT}"
  if [[ -n "${STAGE}" ]]; then ${SUDO} rm -rf "${STAGE}"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

DL_DIR="${BUILD_ROOT}/dl"
mkdir -p "${DL_DIR}"
# apt downloads as the unprivileged _apt user when that user can write the directory.
if [[ "$(id -u)" -eq 0 ]] && id _apt >/dev/null 2>&1; then
  chmod 0755 "${BUILD_ROOT}"
  chown _apt "${DL_DIR}"
fi
log "fetching the kubernetes source package into ${BUILD_ROOT}"
(cd "${DL_DIR}" && apt-get source -qq --download-only kubernetes </dev/null >&2)
dscs=("${DL_DIR}"/kubernetes_*.dsc)
dsc="${dscs[0]}"
[[ -f "${dsc}" ]] || die "apt-get source did not download kubernetes"
dpkg-source --no-check -x "${dsc}" "${BUILD_ROOT}/src-unpacked" >&2 \
  || die "dpkg-source failed to unpack ${dsc}"
rm -rf "${DL_DIR}"

GOPATH_DIR="${BUILD_ROOT}/gopath"
KROOT="${GOPATH_DIR}/src/k8s.io/kubernetes"
mkdir -p "$(dirname "${KROOT}")"
mv "${BUILD_ROOT}/src-unpacked" "${KROOT}"
rm -f "${BUILD_ROOT}"/kubernetes_*  # dpkg-source's link to the orig tarball

[[ -d "${KROOT}/vendor/github.com/modern-go/reflect2" ]] || die "vendored reflect2 not found"

log "replacing vendored github.com/modern-go/reflect2 with 1.0.2 (Go 1.19 fix)"
rm -rf "${KROOT}/vendor/github.com/modern-go/reflect2"
mkdir -p "${KROOT}/vendor/github.com/modern-go/reflect2"
cp -rL "${REFLECT2_SRC}/." "${KROOT}/vendor/github.com/modern-go/reflect2/"
rm -rf "${KROOT}/vendor/github.com/modern-go/reflect2/.git"
# 1.0.2 adds go_above_118.go/go_below_118.go (the Go 1.18+ map iteration fix).
find "${KROOT}/vendor/github.com/modern-go/reflect2" -name '*_test.go' -delete

log "building ${COMPONENTS[*]} (this takes several minutes)"
start_ts="$(date +%s)"
what=""
for c in "${COMPONENTS[@]}"; do what+="cmd/${c} "; done
(
  cd "${KROOT}"
  export PATH="${GO_ROOT}/bin:${PATH}"
  export GOROOT="${GO_ROOT}"
  export GOPATH="${GOPATH_DIR}"
  export GO111MODULE=off GOPROXY=off GOFLAGS="" CGO_ENABLED=0
  export GOCACHE="${BUILD_ROOT}/gocache"
  export KUBE_GIT_VERSION="${KUBE_VERSION}" KUBE_GIT_TREE_STATE=clean
  export KUBE_VERBOSE=1
  make WHAT="${what% }" </dev/null >&2
)
log "build took $(( $(date +%s) - start_ts ))s"

out_dir="${KROOT}/_output/bin"
[[ -d "${out_dir}" ]] || out_dir="$(dirname "$(find "${KROOT}/_output" -type f -name kube-apiserver | head -n1)")"

# --- install atomically into the cache ----------------------------------------------------
STAGE="$(${SUDO} mktemp -d "${CACHE_DIR}/.bin.new.XXXXXX")"
for c in "${COMPONENTS[@]}"; do
  [[ -x "${out_dir}/${c}" ]] || die "build produced no ${c}"
  ${SUDO} install -m 0755 "${out_dir}/${c}" "${STAGE}/${c}"
done
${SUDO} ln -sf "${ETCD_BIN}" "${STAGE}/etcd"
printf '%s\n' "${ETCD_BIN}" | ${SUDO} tee "${STAGE}/etcd.path" >/dev/null
${SUDO} chmod 0755 "${STAGE}"
if [[ -e "${BIN_DIR}" ]]; then
  OLD="${CACHE_DIR}/.bin.old.$$"
  ${SUDO} mv "${BIN_DIR}" "${OLD}"
  ${SUDO} mv "${STAGE}" "${BIN_DIR}"
  ${SUDO} rm -rf "${OLD}"
else
  ${SUDO} mv "${STAGE}" "${BIN_DIR}"
fi
STAGE=""

cached_ok || die "installed binaries in ${BIN_DIR} do not run"
log "binaries cached in ${BIN_DIR}"
echo "${BIN_DIR}"
