"""Hugging Face -> Megatron checkpoint:
`python tools/convert_hf_to_megatron.py --hf-dir DIR --out DIR [--tp N --pp M --vpp K
--dtype bf16|fp32 --verify]`. `--help` lists the options."""

import sys

from megatron_opdlm.conversion.cli import hf_to_megatron_main

if __name__ == "__main__":  # dist_checkpointing's save spawns a manager that re-imports __main__
    sys.exit(hf_to_megatron_main())
