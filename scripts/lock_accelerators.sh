#!/usr/bin/env bash
# Lock the trainer image's JAX accelerator plugins with hashes, on top of requirements/trainer.lock:
#   requirements/trainer-cuda12.lock  = trainer.lock + jax[cuda12] (jax-cuda12-plugin, NVIDIA's CUDA wheels)
#   requirements/trainer-tpu.lock     = trainer.lock + jax[tpu] (libtpu)
# Each starts as a copy of trainer.lock, so uv keeps every pin trainer.lock has and adds only the
# plugin's own packages (tests/k8s/test_images.py checks the shared pins and hashes are equal).
# The jax version is read from trainer.lock, so run this after `make lock`. Needs uv.
set -euo pipefail
cd "$(dirname "$0")/.."

jax_version="$(sed -n 's/^jax==\([^ ]*\) .*/\1/p' requirements/trainer.lock)"
[ -n "$jax_version" ] || { echo "lock_accelerators: no jax pin in requirements/trainer.lock" >&2; exit 1; }

for accelerator in cuda12 tpu; do
  input="requirements/trainer-$accelerator.in"
  output="requirements/trainer-$accelerator.lock"
  printf '# The trainer image'"'"'s accelerator plugin (scripts/lock_accelerators.sh writes this file).\njax[%s]==%s\n' \
    "$accelerator" "$jax_version" > "$input"
  cp requirements/trainer.lock "$output"
  uv pip compile pyproject.toml "$input" --extra ml --extra data --extra rpc --extra cluster \
    --python-version 3.11 --generate-hashes --quiet -o "$output"
  echo "lock_accelerators: wrote $output" >&2
done
