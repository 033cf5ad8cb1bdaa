"""megatron-opdlm: AR LLMs -> block-diffusion LLMs by on-policy distillation on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron-opdlm",
    version="0.1.0",
    description="OPDLM on Megatron-Core: turn pretrained AR LLMs into block-diffusion LLMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_opdlm", "megatron_opdlm.*"]),
    package_data={"megatron_opdlm": ["data/bundled/*.jsonl", "data/bundled/*.md"]},
    install_requires=[
        # 2.13.0 is the release the CPU machines and CI pin; any 2.13+ works on GPU images.
        "torch>=2.13.0",
        "megatron-core>=0.19.2,<0.20",
        "psutil",  # megatron's checkpoint save needs it but does not declare it
        "numpy",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "safetensors",
        "sentencepiece",
        "tokenizers",
    ],
    extras_require={
        # Transformer Engine needs CUDA; Apex is not on PyPI (build it from source on GPU images).
        "gpu": ["transformer-engine[pytorch]"],
        # transformers + gguf + accelerate: HF parity checks and loading the bundled SmolLM2 GGUF.
        "hf": ["transformers>=4.45", "gguf", "accelerate", "matplotlib"],
        "dev": [
            "pytest",
            "pytest-timeout",
            "ruff",
            "transformers>=4.45",
            "gguf",
            "accelerate",
            "matplotlib",
        ],
    },
    entry_points={
        "console_scripts": [
            "opdlm-train=megatron_opdlm.training.cli:main",
            "opdlm-plan=megatron_opdlm.planning.cli:main",
        ]
    },
)
