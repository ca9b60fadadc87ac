#!/usr/bin/env bash
# Make sure promtool (and prometheus) are installed: tests/k8s lints the rules and the scrape
# configuration with promtool, and the integration tests start a real Prometheus.
# Idempotent: does nothing when promtool is already on PATH. Installs Debian's package
# (Prometheus 2.42) with apt-get, as root or through sudo.
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_prometheus: promtool is missing and this system has no apt-get;" \
       "install Prometheus (promtool) by hand" >&2
  exit 1
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "ensure_prometheus: installing prometheus needs root (or sudo)" >&2
    exit 1
  fi
  sudo=(sudo)
fi

echo "ensure_prometheus: installing prometheus (for promtool) with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
# --no-install-recommends keeps out the node exporter and other daemons; the package's own
# service is not started inside containers (no init system), and nothing here needs it running.
"${sudo[@]}" apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v promtool >/dev/null
