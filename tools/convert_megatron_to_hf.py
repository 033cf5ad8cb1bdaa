"""Megatron checkpoint (any TP/PP, teacher or student) -> Hugging Face safetensors:
`python tools/convert_megatron_to_hf.py --ckpt DIR --out DIR [--dtype bf16|fp32]`."""

import sys

from megatron_opdlm.conversion.cli import megatron_to_hf_main

if __name__ == "__main__":
    sys.exit(megatron_to_hf_main())
