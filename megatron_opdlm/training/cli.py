"""`opdlm-train` / `tools/train.py`: run the trainer from a YAML config plus dotted overrides.

    python tools/train.py --config examples/configs/demo_smollm2.yaml train.rollout_steps=20
    torchrun --nproc_per_node=8 tools/train.py --config recipe.yaml parallel.tp=2
    srun python tools/train.py --config recipe.yaml          # SLURM, no torchrun needed

Exit status (training/preemption.py; the SLURM recipes in examples/slurm/ branch on it):
0 finished (all steps ran, or a STOP file in train.run_dir ended the run), 1 on a non-finite
value (nan_policy=stop), 2 on bad input (nothing was run), 3 stopped by a signal or the deadline
after saving a checkpoint: run the same command again and it resumes.
"""

from __future__ import annotations

import argparse
import sys

from megatron_opdlm.cli_errors import ArgumentParser, UsageError, report_usage_error
from megatron_opdlm.config import config_help, load_config
from megatron_opdlm.runtime import distributed
from megatron_opdlm.runtime.logging import get_logger

log = get_logger("training")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="train",
        description="OPDLM: turn an AR model into a block-diffusion LM by on-policy distillation",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (set in the YAML file or as section.key=value):\n" + config_help(),
    )
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--load", help="resume from this checkpoint (same as checkpoint.load=...)")
    parser.add_argument(
        "--check", action="store_true",
        help="only check the config, the layout against the launch's task count and the "
        "checkpoint paths (no process group, no model), then exit 0 or 2",
    )  # fmt: skip
    parser.add_argument(
        "--skip-preflight", action="store_true",
        help="do not run the memory planner before building models (train.preflight=false)",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def check_launch(job) -> None:
    """The layout against the processes launched, before any process group is created."""
    world = distributed.read_launch_env().world_size
    model_parallel = job.parallel.tp * job.parallel.pp
    if world % model_parallel:
        raise UsageError(
            f"parallel.tp={job.parallel.tp} x parallel.pp={job.parallel.pp}",
            f"needs a multiple of {model_parallel} processes, this launch has {world}",
            f"start {model_parallel} (or a multiple) with `torchrun --nproc-per-node "
            f"{model_parallel}`, or lower parallel.tp / parallel.pp",
        )


def preflight(job, world_size: int) -> None:
    """The checks that need no process group (ValueError): run before any rank starts work."""
    from pathlib import Path

    from megatron_opdlm.training import setup

    setup.adopt_teacher_model_config(job)  # reads the teacher's opdlm_model.yaml
    setup.check_job(job, world_size)  # includes: the layout divides the task count
    for name in ("train_prompts", "eval_prompts"):
        path = getattr(job.data, name)
        if path is not None and not Path(path).is_file():
            raise ValueError(f"data.{name}={path!r} is not a file")
    setup.resolve_resume(job)  # checkpoint.load, or save_dir/latest, must be a checkpoint


def main(argv: list[str] | None = None, early_signals: list | None = None) -> int:
    """`early_signals`: (signum, time.monotonic()) of stop signals caught before the trainer
    existed (tools/train.py installs a handler before importing torch)."""
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.load:
        overrides.append(f"checkpoint.load={args.load}")
    if args.skip_preflight:
        overrides.append("train.preflight=false")
    try:
        job = load_config(args.config, overrides)
        check_launch(job)
        preflight(job, distributed.read_launch_env().world_size)
    except (ValueError, OSError) as exc:
        return report_usage_error(exc)
    if args.check:
        log.info("config, layout and checkpoint paths are fine")
        return 0
    distributed.initialize(job.parallel, seed=job.train.seed)
    from megatron_opdlm.training.preemption import EXIT_FINISHED, EXIT_RESUME
    from megatron_opdlm.training.resilience import NonFiniteError
    from megatron_opdlm.training.trainer import Trainer

    try:
        from megatron_opdlm.planning.preflight import preflight as memory_preflight

        if not memory_preflight(job):  # the planner: does this layout fit the GPUs?
            return 2
        try:
            trainer = Trainer(job)
        except ValueError as exc:
            log.error("%s", exc)
            return 2
        for signum, when in early_signals or []:
            trainer.stop._handle(signum, None)  # now recorded by the trainer's own handler
            trainer.stop.signal_time = min(trainer.stop.signal_time, when)
        try:
            result = trainer.train()
        except NonFiniteError as exc:
            log.error("%s", exc, extra={"all_ranks": True})
            return 1
        status = f"stopped early ({result.stopped_early})" if result.stopped_early else "done"
        code = EXIT_RESUME if result.resumable else EXIT_FINISHED
        log.info("%s at rollout step %d, optimizer step %d; checkpoint %s; exit code %d", status,
                 result.rollout_step, result.optimizer_step, result.checkpoint, code)  # fmt: skip
        return code
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
