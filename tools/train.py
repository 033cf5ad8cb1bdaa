"""Train a block-diffusion student by OPDLM: `python tools/train.py --config FILE.yaml [k=v ...]`.

`--help` lists every config field. See megatron_opdlm/training/cli.py for exit codes.
"""

from megatron_opdlm.cli_errors import run_cli

if __name__ == "__main__":  # dist_checkpointing's save spawns a manager that re-imports __main__
    run_cli("megatron_opdlm.training.cli:main")
