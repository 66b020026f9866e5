#!/usr/bin/env bash
# Build the dkiharm container image from ./Containerfile (as root, from anywhere).
#   bash tools/container/build.sh [TAG]     # default TAG: dkiharm:<package version>
# With Docker when its daemon answers; otherwise with Debian's buildah (apt-get install
# buildah debootstrap; tools/install.sh --test installs both), from a Debian 12 base that
# debootstrap makes once (image localhost/dkiharm-base:bookworm), so no registry is needed.
# Environment:
#   TORCH_INDEX_URL   build argument of Containerfile (a CUDA index for a CUDA torch). Unset:
#                     a local CPU wheel of the pinned torch in $DKIHARM_WHEELS or pip's
#                     find-links folders ($PIP_FIND_LINKS, pip config) when there is one,
#                     else PyTorch's CPU index.
#   PIP_CERT          CA bundle for pip during the build (default: the host pip's `cert`)
#   BUILDER           docker or buildah (default: docker when its daemon answers)
#   BUILDAH_ROOT      buildah's storage folder (default: buildah's own)
# Prints the image name on the last line of stdout.
set -euo pipefail
cd "$(dirname "$0")/../.."
die() { echo "container: $*" >&2; exit 1; }
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' dkiharm_nipype/__about__.py)
tag="${1:-dkiharm:$version}"
started=$(date +%s)

# torch: the pinned CPU build from a local wheel when one is at hand (offline machines)
build_args=()
torch_pin=$(sed -n 's/^torch==\(.*\)/\1/p' constraints.txt)
rm -rf tools/container/wheels && mkdir -p tools/container/wheels
if [ -z "${TORCH_INDEX_URL+set}" ]; then
  pip_links=$(python3 -m pip config get global.find-links 2>/dev/null || true)
  for dir in ${DKIHARM_WHEELS:-} ${PIP_FIND_LINKS:-} $pip_links; do
    wheel=$(ls "$dir"/torch-"$torch_pin"+cpu-cp311-cp311-*x86_64.whl 2>/dev/null | head -1 || true)
    if [ -n "$wheel" ]; then
      cp -l "$wheel" tools/container/wheels/ 2>/dev/null || cp "$wheel" tools/container/wheels/
      echo "[container] torch from $wheel"
      build_args+=(--build-arg TORCH_INDEX_URL=)
      break
    fi
  done
else
  build_args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
fi

# a TLS-intercepting proxy: pip inside the build trusts the CA bundle the host's pip trusts
rm -rf tools/container/certs && mkdir -p tools/container/certs
cert=${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
if [ -n "$cert" ] && [ -s "$cert" ]; then
  cp "$cert" tools/container/certs/pip-ca.pem
  echo "[container] pip trusts $cert during the build"
fi

builder=${BUILDER:-}
if [ -z "$builder" ]; then
  builder=buildah
  command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 && builder=docker
fi
if [ "$builder" = docker ]; then
  echo "[container] docker build -t $tag"
  docker build -f Containerfile "${build_args[@]}" -t "$tag" . >&2
  echo "[container] built in $(( $(date +%s) - started )) s"
  echo "$tag"
  exit 0
fi

command -v buildah >/dev/null 2>&1 || die "neither a running Docker nor buildah; apt-get install buildah debootstrap"
bh=(buildah)
[ -n "${BUILDAH_ROOT:-}" ] && bh+=(--root "$BUILDAH_ROOT" --runroot "$BUILDAH_ROOT/run")
base=localhost/dkiharm-base:bookworm
if ! "${bh[@]}" inspect --type image "$base" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null 2>&1 || die "debootstrap not found; apt-get install debootstrap"
  echo "[container] debootstrap Debian 12 (minbase) into $base"
  ctr=$("${bh[@]}" from scratch)
  mnt=$("${bh[@]}" mount "$ctr")
  debootstrap --variant=minbase bookworm "$mnt" >/dev/null \
    || die "debootstrap failed (see $mnt/debootstrap/debootstrap.log)"
  rm -rf "$mnt"/var/lib/apt/lists/* "$mnt"/var/cache/apt/archives/*.deb
  "${bh[@]}" umount "$ctr" >/dev/null
  "${bh[@]}" commit --rm "$ctr" "$base" >/dev/null
  echo "[container] base image made in $(( $(date +%s) - started )) s"
fi
echo "[container] buildah bud --isolation chroot -t $tag"
"${bh[@]}" bud --isolation chroot --layers=false -f Containerfile --build-arg "BASE=$base" \
  "${build_args[@]}" -t "$tag" . >&2
echo "[container] built in $(( $(date +%s) - started )) s"
echo "localhost/$tag"
