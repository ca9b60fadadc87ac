# batchlab: the one entry point. `make run` and `make test` are all a new user types.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements/all.lock
BOOTSTRAP := requirements/bootstrap.lock
UV := $(if $(and $(PIP_INDEX_URL),$(if $(UV_INDEX_URL),,x)),UV_INDEX_URL=$(PIP_INDEX_URL) )$(VENV)/bin/uv
STAMP := $(VENV)/.installed
VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
export JAX_PLATFORMS ?= cpu
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export TF_CPP_MIN_LOG_LEVEL := 2

.DEFAULT_GOAL := help
.PHONY: help setup protos run test bench bench-gpu lint lock images images-smoke k8s-check clean

help: ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# The installer is uv, itself pinned by hash (requirements/bootstrap.lock) and installed by pip:
# it installs the hashed lock in seconds where pip takes minutes. It reads PyPI (or UV_INDEX_URL),
# not pip's configuration: a PIP_INDEX_URL is passed on as UV_INDEX_URL when that is unset.
# --compile-bytecode as pip does: without .pyc files every Python process (each test's servers
# and workers) compiles jax, ray and the rest again where PYTHONDONTWRITEBYTECODE is set
# (importing them took 9.9 s instead of 4.0 s here).
$(STAMP): $(LOCK) $(BOOTSTRAP) pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --require-hashes -r $(BOOTSTRAP)
	$(UV) pip install --python $(PY) --quiet --compile-bytecode --require-hashes -r $(LOCK)
	$(UV) pip install --python $(PY) --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

setup: $(STAMP) ## create .venv from the pinned lock, generate protos, install promtool (idempotent)
	@$(PY) -m batchlab.proto.generate --if-stale
	@scripts/ensure_prometheus.sh || echo "setup: Prometheus/promtool not installed; the tests that need them will be skipped" >&2

protos: $(STAMP) ## regenerate Python code from protos/ into libs/batchlab/proto/v1 (git-ignored)
	$(PY) -m batchlab.proto.generate

run: setup ## run the main job on the embedded default
	$(PY) -m batchlab.cli demo --out results/demo

test: setup ## run the test suite (two workers: the system tests on one, the rest beside them)
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=25

bench: setup ## side-by-side benchmarks, written to benchmarks/results/
	$(PY) -m benchmarks.run --out benchmarks/results

bench-gpu: $(STAMP) ## GPU figures (CUDA plugin from the lock; reduced on a CPU): benchmarks/gpu.sh
	benchmarks/gpu.sh

images: ## build the images (docker, podman or buildah): batchlab/control, batchlab/trainer (-tpu, -cpu)
	VERSION=$(VERSION) scripts/build_images.sh

images-smoke: setup ## run each image as uid 10001 on a read-only root: gRPC health, /metrics, Ray :52365/api/healthz
	$(PY) scripts/smoke_images.py

k8s-check: setup ## validate every kustomize build offline (schemas, KubeRay rules, placement, policies, promtool), the reconciler
	$(PY) -m pytest -q tests/k8s tests/services/controller/test_reconciler.py tests/services/trainer/test_metrics_exporter.py

lint: setup ## ruff, the import contracts (pyproject [tool.importlinter]) and mypy
	$(VENV)/bin/ruff check libs tests benchmarks services scripts
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/mypy

lock: $(STAMP) ## re-resolve the lock files from pyproject.toml with the venv's pinned uv (requirements/bootstrap.lock, bumped by hand)
	$(UV) pip compile pyproject.toml --extra all --python-version 3.11 --generate-hashes -o requirements/all.lock
	$(UV) pip compile pyproject.toml --extra rpc --extra report --extra cluster --extra data --python-version 3.11 --generate-hashes -o requirements/controller.lock
	$(UV) pip compile pyproject.toml --extra ml --extra data --extra rpc --extra cluster --python-version 3.11 --generate-hashes -o requirements/trainer.lock
	scripts/lock_accelerators.sh

clean: ## remove the virtual environment and generated results
	rm -rf $(VENV) results
