"""`opdlm-train` / `tools/train.py`: run the trainer from a YAML config plus dotted overrides.

    python tools/train.py --config examples/configs/tiny_cpu.yaml train.rollout_steps=20
    torchrun --nproc_per_node=8 tools/train.py --config recipe.yaml parallel.tp=2
    srun python tools/train.py --config recipe.yaml          # SLURM, no torchrun needed

Exit status: 0 when training finished or stopped cleanly (signal, deadline: a checkpoint was
saved), 1 on a non-finite value (nan_policy=stop), 2 on bad input (nothing was run).
"""

from __future__ import annotations

import argparse
import sys

from megatron_opdlm.config import config_help, load_config
from megatron_opdlm.runtime import distributed
from megatron_opdlm.runtime.logging import get_logger

log = get_logger("training")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train",
        description="OPDLM: turn an AR model into a block-diffusion LM by on-policy distillation",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (set in the YAML file or as section.key=value):\n" + config_help(),
    )
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--load", help="resume from this checkpoint (same as checkpoint.load=...)")
    parser.add_argument(
        "--skip-preflight", action="store_true",
        help="do not run the memory planner before building models (train.preflight=false)",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.load:
        overrides.append(f"checkpoint.load={args.load}")
    if args.skip_preflight:
        overrides.append("train.preflight=false")
    try:
        job = load_config(args.config, overrides)
    except ValueError as exc:
        log.error("bad config: %s", exc)
        return 2
    distributed.initialize(job.parallel, seed=job.train.seed)
    from megatron_opdlm.training.resilience import NonFiniteError
    from megatron_opdlm.training.trainer import Trainer

    try:
        from megatron_opdlm.planning.preflight import preflight

        if not preflight(job):
            return 2
        try:
            trainer = Trainer(job)
        except ValueError as exc:
            log.error("%s", exc)
            return 2
        try:
            result = trainer.train()
        except NonFiniteError as exc:
            log.error("%s", exc, extra={"all_ranks": True})
            return 1
        status = f"stopped early ({result.stopped_early})" if result.stopped_early else "done"
        log.info("%s at rollout step %d, optimizer step %d; checkpoint %s", status,
                 result.rollout_step, result.optimizer_step, result.checkpoint)  # fmt: skip
        return 0
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
