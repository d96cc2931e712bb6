#!/usr/bin/env bash
# Build the shipped images (docker/*.Dockerfile) with buildah, with no registry, for the
# real-node tests (tests/kube/test_real_node.py), and export each as a docker-archive
# for `ctr -n k8s.io images import`.
#
#   scripts/build-images.sh [--check] [IMAGE...]      IMAGE: controller, agent, inference
#                                                     (default: all three)
#
# Prints one line per image on stdout:  NAME REF ARCHIVE SIZE_BYTES
# (SIZE_BYTES: the image's uncompressed size, which is also about the archive's size).
# With --check nothing is built: exit 3 when an image is not cached for the current inputs.
#
# 1. The base. No registry is reachable, so python:3.11-slim is replaced by a local image
#    with the same Python (bookworm's 3.11): `debootstrap --variant=minbase bookworm` plus
#    python3, venv, `python` and passwd, committed with buildah from scratch. The
#    Dockerfiles take it through their PYTHON_IMAGE build argument (ARG before FROM).
# 2. Each image: `buildah bud --isolation chroot --pull=never --layers`, the same
#    Dockerfile users build. Its RUN steps install from PyPI, pinned (pip constraints,
#    through the Dockerfiles' PIP_CONSTRAINT build argument) to the versions of the
#    test environment ($EDGEFLEET_VENV, else .venv; unpinned when there is none): the
#    dependency closure of edgefleet[controller] there, so the images run what the suite
#    tests. The machine's CA bundle (this machine reaches PyPI through a proxy of its own)
#    and the pins are mounted into the RUN steps only: nothing of this machine ends up in
#    an image.
#
# Everything is cached OUTSIDE the checkout, in ${EDGEFLEET_IMAGE_CACHE:-/var/cache/edgefleet/images}:
# buildah's store (storage/), and archives/NAME-KEY.tar where KEY hashes every input of
# the image: the base, the Dockerfile, the files it COPYs from the context (the same
# allow-list as .dockerignore, minus bytecode) and the pins. An image whose inputs did not
# change is not rebuilt; the three newest archives of each image are kept.
#
# Needs root; runs non-interactively; installs buildah and debootstrap if missing.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive LC_ALL=C

REPO="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${EDGEFLEET_IMAGE_CACHE:-/var/cache/edgefleet/images}"
ALL_IMAGES=(controller agent inference)
SUITE="bookworm"
BASE_PACKAGES=(python3 python3-venv python-is-python3 ca-certificates passwd)
RECIPE="edgefleet-images-v2"  # bump to rebuild everything after a change of this script
KEEP=3

log() { printf '[build-images] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

check_only=0
images=()
for arg in "$@"; do
  case "${arg}" in
    --check) check_only=1 ;;
    controller|agent|inference) images+=("${arg}") ;;
    *) die "unknown argument ${arg} (images: ${ALL_IMAGES[*]}; --check)" ;;
  esac
done
[[ "${#images[@]}" -gt 0 ]] || images=("${ALL_IMAGES[@]}")
[[ "$(id -u)" -eq 0 ]] || die "needs root (buildah's chroot isolation and debootstrap)"

if [[ "${check_only}" -eq 0 ]]; then
  missing=()
  for p in buildah debootstrap; do
    command -v "${p}" >/dev/null 2>&1 || missing+=("${p}")
  done
  if [[ "${#missing[@]}" -gt 0 ]]; then
    log "installing: ${missing[*]}"
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >&2
  fi
fi
command -v buildah >/dev/null 2>&1 || die "buildah is not installed (run without --check)"

mkdir -p "${CACHE}/archives"
BH=(buildah --root "${CACHE}/storage" --runroot "${CACHE}/run" --storage-driver overlay)

sha() { sha256sum | cut -d' ' -f1; }

# --- the pins: the test environment's packages, less the project itself -----------------
VENV="${EDGEFLEET_VENV:-${REPO}/.venv}"
CONSTRAINTS="$(mktemp "${TMPDIR:-/tmp}/edgefleet-constraints.XXXXXX")"
PIPCONF="$(mktemp "${TMPDIR:-/tmp}/edgefleet-pip.XXXXXX")"
WORK=""
cleanup() {
  rm -f "${CONSTRAINTS}" "${PIPCONF}"
  if [[ -n "${WORK}" ]]; then
    # debootstrap mounts /proc and /sys inside its target; never leave one behind.
    findmnt -rn -o TARGET | grep -F "${WORK}/" | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf "${WORK}"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
if [[ -x "${VENV}/bin/python" ]]; then
  # Only what the images install, so that a new test tool in the environment rebuilds
  # nothing: edgefleet[controller] (which includes the agent extra) and its dependencies,
  # recursively, at this environment's versions.
  "${VENV}/bin/python" - >"${CONSTRAINTS}" <<'PY'
import importlib.metadata as md

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pins: dict[str, str] = {}
seen: set[tuple[str, str]] = set()
todo = [("edgefleet", "controller")]
while todo:
    name, extra = todo.pop()
    if (name, extra) in seen:
        continue
    seen.add((name, extra))
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        continue
    if canonicalize_name(name) != "edgefleet":
        pins[canonicalize_name(name)] = dist.version
    for raw in dist.requires or []:
        req = Requirement(raw)
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        todo.append((req.name, ""))
        todo.extend((req.name, e) for e in req.extras)
for name in sorted(pins):
    print(f"{name}=={pins[name]}")
PY
else
  log "no test environment found: the Python dependencies are not pinned"
fi
printf '[global]\ncert = /run/edgefleet-build/ca-certificates.crt\n' >"${PIPCONF}"
# The pins reach pip through the Dockerfiles' PIP_CONSTRAINT build argument, a
# path named by their hash: buildah's layer cache keys on it, so new pins rebuild the
# install step (a mounted file alone would not).
PINS_PATH="/run/edgefleet-build/constraints-$(sha256sum <"${CONSTRAINTS}" | cut -c1-16).txt"

# --- 1. the base ----------------------------------------------------------------------
base_key="$(printf '%s\n' "${RECIPE}" "${SUITE}" minbase "${BASE_PACKAGES[@]}" | sha)"
BASE_REF="localhost/edgefleet/python-base:${SUITE}-${base_key:0:12}"

have_image() { "${BH[@]}" inspect --type image "$1" >/dev/null 2>&1; }

debian_mirror() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f "${f}" ]] || continue
    uri="$(awk '/^[[:space:]]*URIs:/ {print $2; exit}' "${f}")"
    if [[ "${uri}" =~ /debian/?$ ]]; then echo "${uri}"; return; fi
  done
  uri="$(grep -hsE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
    2>/dev/null | sed -E 's/\[[^]]*\]//' | awk '$2 ~ /\/debian\/?$/ {print $2; exit}')"
  echo "${uri:-http://deb.debian.org/debian}"
}

build_base() {
  local started mirror ctr mnt
  started="$(date +%s)"
  mirror="$(debian_mirror)"
  WORK="$(mktemp -d "${CACHE}/.base.XXXXXX")"
  log "debootstrap --variant=minbase ${SUITE} from ${mirror} (a few minutes)"
  debootstrap --variant=minbase --include="$(IFS=,; echo "${BASE_PACKAGES[*]}")" \
    "${SUITE}" "${WORK}/root" "${mirror}" >"${WORK}/debootstrap.log" 2>&1 \
    || { tail -n 30 "${WORK}/debootstrap.log" >&2; die "debootstrap failed"; }
  findmnt -rn -o TARGET | grep -F "${WORK}/" | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "${WORK}/root/var/lib/apt/lists/"* "${WORK}/root/var/cache/apt/"* \
    "${WORK}/root/var/cache/debconf/"*-old "${WORK}/root/var/log/"* \
    "${WORK}/root/usr/share/doc/"* "${WORK}/root/usr/share/man/"* "${WORK}/root/usr/share/info/"* \
    "${WORK}/root/usr/share/locale/"*
  ctr="$("${BH[@]}" from scratch)"
  mnt="$("${BH[@]}" mount "${ctr}")"
  cp -a "${WORK}/root/." "${mnt}/"
  "${BH[@]}" umount "${ctr}" >/dev/null
  "${BH[@]}" config \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd '["python3"]' \
    --label "io.edgefleet.base=debootstrap ${SUITE} minbase: ${BASE_PACKAGES[*]}" "${ctr}"
  "${BH[@]}" commit --quiet --rm "${ctr}" "${BASE_REF}" >/dev/null
  rm -rf "${WORK}"
  WORK=""
  log "base ${BASE_REF} built in $(( $(date +%s) - started ))s"
  # Older bases (of an earlier recipe) go; images built on them keep their layers.
  "${BH[@]}" images --format '{{.Name}}:{{.Tag}}' 2>/dev/null \
    | grep -F 'localhost/edgefleet/python-base:' | grep -vxF "${BASE_REF}" \
    | xargs -r "${BH[@]}" rmi >/dev/null 2>&1 || true
}

# --- 2. the images --------------------------------------------------------------------
# The context files an image's Dockerfile COPYs (not --from another stage).
copy_sources() {
  awk 'toupper($1) == "COPY" && $2 !~ /^--from/ { for (i = 2; i < NF; i++) if ($i !~ /^--/) print $i }' "$1"
}

image_key() {
  local name="$1" df="${REPO}/docker/$1.Dockerfile" src
  {
    printf '%s\nbase %s\n' "${RECIPE}" "${BASE_REF}"
    sha256sum <"${df}"
    sha256sum <"${CONSTRAINTS}"
    for src in $(copy_sources "${df}" | sort -u); do
      [[ -e "${REPO}/${src}" ]] || die "${df}: COPY source ${src} is missing"
      (cd "${REPO}" && find "${src}" -type f ! -path '*/__pycache__/*' ! -name '*.py[cod]' \
        -print0 | sort -z | xargs -0 sha256sum)
    done
  } | sha
}

prune() {
  local name="$1" old
  # Newest first; everything past the KEEP newest goes, with its image.
  ls -1t "${CACHE}/archives/${name}-"*.tar 2>/dev/null | tail -n +$((KEEP + 1)) | while read -r old; do
    log "pruning ${old}"
    rm -f "${old}"
    key="$(basename "${old}" .tar)"
    "${BH[@]}" rmi "localhost/edgefleet/${name}:${key#"${name}-"}" >/dev/null 2>&1 || true
  done
}

build_image() {
  local name="$1" ref="$2" archive="$3" started
  started="$(date +%s)"
  log "buildah bud docker/${name}.Dockerfile -> ${ref}"
  (
    cd "${REPO}"
    # --format docker: OCI image configs have no HEALTHCHECK.
    "${BH[@]}" bud --isolation chroot --pull=never --layers --quiet --format docker \
      -f "docker/${name}.Dockerfile" \
      --build-arg "PYTHON_IMAGE=${BASE_REF}" \
      -v "/etc/ssl/certs/ca-certificates.crt:/run/edgefleet-build/ca-certificates.crt:ro" \
      --build-arg "PIP_CONSTRAINT=${PINS_PATH}" \
      -v "${CONSTRAINTS}:${PINS_PATH}:ro" \
      -v "${PIPCONF}:/etc/pip.conf:ro" \
      -t "${ref}" . >&2
  )
  rm -f "${archive}.new"
  "${BH[@]}" push --quiet "${ref}" "docker-archive:${archive}.new:${ref}" >&2
  mv -f "${archive}.new" "${archive}"
  log "${name} built in $(( $(date +%s) - started ))s"
  prune "${name}"
}

if ! have_image "${BASE_REF}"; then
  [[ "${check_only}" -eq 0 ]] || { log "base ${BASE_REF} not built"; exit 3; }
  build_base
fi

status=0
for name in "${images[@]}"; do
  key="$(image_key "${name}")"
  ref="localhost/edgefleet/${name}:${key:0:16}"
  archive="${CACHE}/archives/${name}-${key:0:16}.tar"
  if [[ ! -s "${archive}" ]] || ! have_image "${ref}"; then
    if [[ "${check_only}" -eq 1 ]]; then
      log "${name}: not built for the current inputs (run scripts/build-images.sh ${name})"
      status=3
      continue
    fi
    build_image "${name}" "${ref}" "${archive}"
  fi
  size="$("${BH[@]}" inspect --type image --format '{{.Size}}' "${ref}" 2>/dev/null || true)"
  [[ "${size}" =~ ^[0-9]+$ ]] || size="$(stat -c %s "${archive}")"
  echo "${name} ${ref} ${archive} ${size}"
done
if [[ "${check_only}" -eq 0 ]]; then
  # Untagged images: the build stages' layers (about 400 MB an image). Keeping them would
  # spare only a rebuild of the same sources, which the archives already spare.
  "${BH[@]}" rmi --prune >/dev/null 2>&1 || true
fi
exit "${status}"
