"""Megatron checkpoint (any TP/PP, teacher or student) -> Hugging Face safetensors:
`python tools/convert_megatron_to_hf.py --ckpt DIR --out DIR [--dtype bf16|fp32]`."""

from megatron_opdlm.cli_errors import run_cli

if __name__ == "__main__":
    run_cli("megatron_opdlm.conversion.cli:megatron_to_hf_main")
