#!/usr/bin/env bash
# Build batchlab's container images with docker, podman or buildah, whichever works here.
#
#   scripts/build_images.sh                 # every image (what `make images` runs)
#   scripts/build_images.sh control trainer # some of them
#   scripts/build_images.sh --list          # the image references it builds, one a line
#
# Images (tags are pyproject.toml's version, $VERSION overrides):
#   control      batchlab/control:V        services/controller/Dockerfile
#   trainer      batchlab/trainer:V        services/trainer/Dockerfile (JAX_ACCELERATOR=cuda12)
#   trainer-tpu  batchlab/trainer:V-tpu    services/trainer/Dockerfile (JAX_ACCELERATOR=tpu)
#   trainer-cpu  batchlab/trainer:V-cpu    services/trainer/Dockerfile (JAX_ACCELERATOR=cpu: no
#                                          CUDA; k8s/overlays/dev runs it)
#
# Settings (environment):
#   BATCHLAB_IMAGE_ENGINE  docker | buildah | podman (default: the first that works, in that order)
#   BATCHLAB_PYTHON_IMAGE  the base both stages build from. Default with buildah or podman, as
#                          root with debootstrap installed: localhost/batchlab/python-base:3.11-bookworm,
#                          built from Debian's archive by scripts/debian_base_image.sh when missing
#                          (for machines that reach Debian's mirrors but no container registry);
#                          otherwise python:3.11-slim-bookworm from the registry.
#   BATCHLAB_BUILD_CA_BUNDLE  CA certificates pip trusts inside the build (a build secret, kept
#                          out of the layers); default: $PIP_CERT, else $SSL_CERT_FILE, else
#                          /etc/ssl/certs/ca-certificates.crt. Needed behind a TLS-inspecting proxy.
# Layers and pip's download cache are kept between builds (RUN --mount=type=cache), so a rebuild
# after a code change redoes only the last steps. Build times and sizes are printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)}"
declare -A REF=(
  [control]="batchlab/control:$VERSION"
  [trainer]="batchlab/trainer:$VERSION"
  [trainer-tpu]="batchlab/trainer:$VERSION-tpu"
  [trainer-cpu]="batchlab/trainer:$VERSION-cpu"
)
declare -A DOCKERFILE=(
  [control]=services/controller/Dockerfile
  [trainer]=services/trainer/Dockerfile
  [trainer-tpu]=services/trainer/Dockerfile
  [trainer-cpu]=services/trainer/Dockerfile
)
declare -A ACCELERATOR=([trainer]=cuda12 [trainer-tpu]=tpu [trainer-cpu]=cpu)
DEFAULT_SET=(control trainer trainer-tpu trainer-cpu)

if [ "${1:-}" = "--list" ]; then
  for name in "${DEFAULT_SET[@]}"; do echo "${REF[$name]}"; done
  exit 0
fi
selected=("$@")
[ ${#selected[@]} -gt 0 ] || selected=("${DEFAULT_SET[@]}")
for name in "${selected[@]}"; do
  [ -n "${REF[$name]:-}" ] || { echo "build_images: unknown image '$name' (known: ${!REF[*]})" >&2; exit 2; }
done

engine="${BATCHLAB_IMAGE_ENGINE:-}"
if [ -z "$engine" ]; then
  # A docker CLI without a reachable daemon does not count. buildah before podman: it is the
  # build tool (podman builds through it), and it builds where podman cannot run containers.
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker
  elif command -v buildah >/dev/null; then engine=buildah
  elif command -v podman >/dev/null && podman info >/dev/null 2>&1; then engine=podman
  else
    echo "build_images: no container engine: install docker or podman, or buildah" \
         "(apt-get install -y buildah debootstrap builds from Debian's archive alone)" >&2
    exit 1
  fi
fi

base="${BATCHLAB_PYTHON_IMAGE:-}"
if [ -z "$base" ]; then
  if [ "$engine" != docker ] && command -v debootstrap >/dev/null && [ "$(id -u)" -eq 0 ]; then
    base=localhost/batchlab/python-base:3.11-bookworm
    BATCHLAB_BASE_IMAGE_NAME="$base" scripts/debian_base_image.sh
  else
    base=python:3.11-slim-bookworm
  fi
fi

ca_bundle="${BATCHLAB_BUILD_CA_BUNDLE:-${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}}"

build() {  # build NAME: one image with the chosen engine
  local name="$1" args=(--build-arg "PYTHON_IMAGE=$base" -t "${REF[$1]}" -f "${DOCKERFILE[$1]}")
  [ -n "${ACCELERATOR[$name]:-}" ] && args+=(--build-arg "JAX_ACCELERATOR=${ACCELERATOR[$name]}")
  [ -s "$ca_bundle" ] && args+=(--secret "id=ca-bundle,src=$ca_bundle")
  case "$engine" in
    docker) DOCKER_BUILDKIT=1 docker build "${args[@]}" . ;;
    podman) podman build --layers "${args[@]}" . ;;
    # chroot isolation: no user namespaces or cgroups needed, so it builds inside containers too.
    buildah) buildah bud --layers --isolation chroot "${args[@]}" . ;;
    *) echo "build_images: unknown engine '$engine'" >&2; exit 2 ;;
  esac
}

size_of() {  # size_of REF: the image's size as the engine reports it
  case "$engine" in
    docker) docker images --format '{{.Size}}' "$1" | head -1 ;;
    podman) podman images --format '{{.Size}}' "$1" | head -1 ;;
    buildah) buildah images --noheading --format '{{.Size}}' --filter "reference=$1" | head -1 ;;
  esac
}

summary=()
total_start=$SECONDS
for name in "${selected[@]}"; do
  start=$SECONDS
  echo "build_images: $engine builds ${REF[$name]} from ${DOCKERFILE[$name]} (base $base)" >&2
  build "$name"
  summary+=("$(printf '%-12s %-28s %5d s  %s' "$name" "${REF[$name]}" $((SECONDS - start)) "$(size_of "${REF[$name]}")")")
done
echo "build_images: built with $engine in $((SECONDS - total_start)) s" >&2
printf '  %s\n' "${summary[@]}" >&2
