#!/usr/bin/env bash
# Build the images' base from Debian's archive, for machines that reach Debian's mirrors but no
# container registry: a minimal bookworm root made with debootstrap, plus Debian's Python 3.11
# (the interpreter the locks are resolved for), committed with buildah as
#   localhost/batchlab/python-base:3.11-bookworm
# Both Dockerfiles take it as their PYTHON_IMAGE (scripts/build_images.sh passes it).
#
# Needs root, debootstrap and buildah (apt-get install -y buildah debootstrap). Idempotent: the
# root file system is kept as a tarball under $BATCHLAB_IMAGE_CACHE (default
# /var/cache/batchlab-images) and the image is built only when it is missing; --rebuild makes
# both again (e.g. for Debian's security updates).
set -euo pipefail

IMAGE="${BATCHLAB_BASE_IMAGE_NAME:-localhost/batchlab/python-base:3.11-bookworm}"
CACHE="${BATCHLAB_IMAGE_CACHE:-/var/cache/batchlab-images}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
# What the images need from Debian: Python 3.11 with venv (ensurepip), CA certificates for pip,
# and the C++ runtime that jaxlib, grpcio and pyarrow link against. bash comes with minbase
# (KubeRay starts Ray through `bash -lc`). python3-distutils provides python3.11-distutils, which
# python3.11-venv needs and debootstrap (no virtual packages) does not pull in by itself.
PACKAGES=python3.11,python3.11-venv,python3-distutils,python3-lib2to3,ca-certificates,libstdc++6
ROOTFS_TAR="$CACHE/debian-$SUITE-python3.11.tar"

rebuild=0
[ "${1:-}" = "--rebuild" ] && rebuild=1

if [ "$rebuild" -eq 0 ] && buildah inspect --type image "$IMAGE" >/dev/null 2>&1; then
  echo "debian_base_image: $IMAGE exists" >&2
  exit 0
fi
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "debian_base_image: $tool is not installed (apt-get install -y buildah debootstrap)" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "debian_base_image: debootstrap needs root" >&2; exit 1; }

mkdir -p "$CACHE"
if [ "$rebuild" -eq 1 ] || [ ! -s "$ROOTFS_TAR" ]; then
  root="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
  trap 'rm -rf "$root"' EXIT
  echo "debian_base_image: debootstrap $SUITE from $MIRROR" >&2
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >&2
  # No package caches or lists in the image; the images install nothing with apt later.
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*
  tar --numeric-owner -C "$root" -cf "$ROOTFS_TAR.tmp" .
  mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
  rm -rf "$root"
  trap - EXIT
fi

container="$(buildah from scratch)"
trap 'buildah rm "$container" >/dev/null 2>&1 || true' EXIT
buildah add "$container" "$ROOTFS_TAR" / >/dev/null
# python3 is Debian's 3.11; `python` as in the python:3.11-slim images the Dockerfiles default to.
buildah run --isolation chroot "$container" -- ln -sf /usr/bin/python3.11 /usr/local/bin/python
buildah config \
  --env LANG=C.UTF-8 \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --label org.opencontainers.image.description="Debian $SUITE (debootstrap minbase) with Python 3.11, the batchlab images' base" \
  --cmd '["python3"]' "$container"
buildah commit --rm "$container" "$IMAGE" >/dev/null
trap - EXIT
echo "debian_base_image: built $IMAGE" >&2
