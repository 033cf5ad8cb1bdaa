"""Hugging Face -> Megatron checkpoint:
`python tools/convert_hf_to_megatron.py --hf-dir DIR --out DIR [--tp N --pp M --vpp K
--dtype bf16|fp32 --verify]`. `--help` lists the options."""

from megatron_opdlm.cli_errors import run_cli

if __name__ == "__main__":  # dist_checkpointing's save spawns a manager that re-imports __main__
    run_cli("megatron_opdlm.conversion.cli:hf_to_megatron_main")
