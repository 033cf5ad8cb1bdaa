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
    package_data={
        "megatron_opdlm": [
            "data/bundled/*.jsonl",
            "data/bundled/*.md",
            # copied into every HF export (remote code) and read by lm-eval (--include_path)
            "hf_export/remote_code/*.py",
            "evaluation/lm_eval_tasks/*",
        ]
    },  # fmt: skip
    install_requires=[
        # megatron-core's own floor, so that the torch of an NGC PyTorch image (a 2.x pre-release
        # build) satisfies it and pip leaves it alone; the exact versions the suite is measured
        # with are pinned in constraints.txt and the Makefile, not here.
        "torch>=2.6",
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
        # lm-evaluation-harness backend (megatron_opdlm.evaluation.lm_eval_backend); the HF
        # export's remote code needs transformers 5.x
        "eval": ["lm-eval>=0.4.8,<0.5", "transformers>=5.0,<6"],
        "dev": [
            "pytest",
            "pytest-timeout",
            "ruff",
            "transformers>=4.45",
            "gguf",
            "accelerate",
            "matplotlib",
            "lm-eval>=0.4.8,<0.5",
        ],
    },
    entry_points={
        "console_scripts": [
            "opdlm-train=megatron_opdlm.training.cli:main",
            "opdlm-lm-eval=megatron_opdlm.evaluation.lm_eval_cli:main",
            "opdlm-plan=megatron_opdlm.planning.cli:main",
            "opdlm-reshard-checkpoint=megatron_opdlm.training.reshard:console_main",
        ],
        # harness versions that discover external models through this group
        "lm_eval.models": ["opdlm=megatron_opdlm.evaluation.lm_eval_backend:OpdlmLM"],
    },
)
