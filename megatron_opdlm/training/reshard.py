"""Change the TP/PP/VPP layout of a `dp_reshardable` training checkpoint.

megatron-core 0.19 cannot do this itself: `dp_reshardable` stores each TPxPP group's optimizer
state as the flat buckets of its DistributedOptimizer (keyed by `dp_group_idx`, laid out by that
layout's parameter sharding), and its only model-space format without a gather,
`fully_sharded_model_space`, is rejected by 0.19's ShardedTensor (`flattened_range`); Megatron-LM
refuses such a load and asks for a re-save with `--dist-ckpt-optim-fully-reshardable`. This
module does that re-save as a one-off conversion:

1. the processes (any number that the saved tp x pp divides: dp_reshardable itself reshards over
   DP) take the saved layout (parallel state re-initialised from the checkpoint's config.yaml),
   build the student, DDP and optimizer there and load the checkpoint's optimizer natively;
2. they write its optimizer state in `fully_reshardable` (model-space) format into a new
   complete checkpoint `<iter>_fully_reshardable` beside the original (temp name, then rename);
   model/, tokenizer/, RNG and metadata files are hard links to the original's (copies across
   file systems); `latest` moves to the copy when it named the original;
3. the caller goes back to its own layout and loads the copy, which loads at any TP/PP/DP.

The trainer does this automatically (`convert_if_needed`, before it builds its models) when its
world size is a multiple of the saved tp x pp; otherwise `tools/reshard_checkpoint.py` (console
`opdlm-reshard-checkpoint`) does it, launched with the saved process count. A copy that exists
already is reused. The original is left untouched. Cost: one model + optimizer build at the old
layout, a read of the optimizer state and a DP-gathered write of it (once per checkpoint).
Memory: the student and its optimizer at the saved tp/pp with DP = world / (tp x pp), and no
teacher; on fewer processes than were saved each rank holds a larger optimizer shard; if that
does not fit, run the tool with the saved process count.
"""

from __future__ import annotations

import argparse
import errno
import gc
import json
import os
import shutil
from pathlib import Path

from megatron_opdlm.cli_errors import ArgumentParser, UsageError
from megatron_opdlm.runtime import collectives
from megatron_opdlm.runtime.logging import get_logger
from megatron_opdlm.training import checkpointing

log = get_logger(__name__)

SUFFIX = "_fully_reshardable"
TOOL = "tools/reshard_checkpoint.py"
MODEL_PARALLEL_KEYS = ("tp", "pp", "vpp")


def converted_path(ckpt: Path) -> Path:
    return ckpt.parent / f"{ckpt.name}{SUFFIX}"


def tool_command(ckpt: Path, saved_world: int) -> str:
    return f"torchrun --nproc-per-node {saved_world} {TOOL} {ckpt}"


def needs_conversion(ckpt: Path, layout: dict[str, int]) -> bool:
    """True when `ckpt` holds a dp_reshardable distributed optimizer saved at another tp/pp/vpp."""
    state = checkpointing.read_trainer_state(ckpt)
    if not checkpointing.is_dp_sharded(ckpt) or state.get("within_step"):
        return False  # a mid-step checkpoint resumes at its own layout only (check_resume_layout)
    saved = state.get("layout") or {}
    return any(saved.get(key) != layout[key] for key in MODEL_PARALLEL_KEYS)


def _saved_job(ckpt: Path):
    from megatron_opdlm.config import load_config

    return load_config(str(ckpt / checkpointing.CONFIG_FILE))


def check_process_count(ckpt: Path, world_size: int) -> None:
    """UsageError unless `world_size` processes can take the saved tp x pp of `ckpt`."""
    saved = checkpointing.read_trainer_state(ckpt).get("layout") or {}
    model_parallel = saved.get("tp", 1) * saved.get("pp", 1)
    if world_size % model_parallel:
        raise UsageError(
            str(ckpt),
            f"it was saved at tp={saved.get('tp')} pp={saved.get('pp')} ({saved.get('world_size')}"
            f" processes) and its conversion needs a multiple of {model_parallel} processes, "
            f"this launch has {world_size}",
            f"run `{tool_command(ckpt, saved.get('world_size', model_parallel))}` "
            "(or srun with that many tasks)",
        )


def convert_if_needed(ckpt: Path | None, job) -> Path | None:
    """The checkpoint the trainer should load: `ckpt`, or its fully_reshardable copy (made now,
    collectively, when the layout changed). Call before any model is built; leaves the parallel
    state at `job.parallel`."""
    if ckpt is None:
        return None
    copy = converted_path(ckpt)
    if not needs_conversion(ckpt, checkpointing.layout_signature(job)):
        return ckpt
    if checkpointing.is_training_checkpoint(copy):
        log.info("%s: using its fully_reshardable copy %s", ckpt, copy)
        return copy
    check_process_count(ckpt, collectives.group_size())
    from megatron_opdlm.runtime import distributed

    try:
        convert(ckpt, copy)
    finally:
        distributed.initialize(job.parallel, seed=job.train.seed)
    return copy


def convert(ckpt: Path, out: Path) -> Path:
    """Write `out`: `ckpt` with its optimizer state in fully_reshardable format; collective.

    Re-initialises the parallel state at the saved tp/pp/vpp (the caller restores its own).
    """
    from megatron.core import dist_checkpointing

    from megatron_opdlm.models.builder import build_student
    from megatron_opdlm.runtime import distributed
    from megatron_opdlm.training.optimizer import build_optimizer, wrap_ddp

    check_process_count(ckpt, collectives.group_size())
    state = checkpointing.read_trainer_state(ckpt)
    saved = _saved_job(ckpt)
    layout = state["layout"]
    saved.parallel.tp, saved.parallel.pp = layout["tp"], layout["pp"]
    saved.parallel.vpp = layout["vpp"] or None
    log.info("%s: converting its dp_reshardable optimizer state (tp=%d pp=%d vpp=%d) to "
             "fully_reshardable in %s", ckpt, layout["tp"], layout["pp"], layout["vpp"],
             out)  # fmt: skip
    distributed.initialize(saved.parallel, seed=saved.train.seed)
    tmp = out.parent / f".{out.name}.tmp"
    error = None
    if collectives.group_rank() == 0:
        try:
            if tmp.exists():
                shutil.rmtree(tmp)  # left by an interrupted conversion
            (tmp / checkpointing.OPTIMIZER_DIR).mkdir(parents=True)
        except OSError as exc:
            error = (
                f"cannot write the converted checkpoint {tmp} ({exc}); run "
                f"`{tool_command(ckpt, layout['world_size'])} --output DIR` with a writable DIR"
            )
    checkpointing.agree_on_error(error)
    # The model weights are not loaded: the optimizer holds the fp32 main params itself, and
    # model/ is linked as is (layout-free). The model only describes the parameters' sharding.
    chunks = wrap_ddp(build_student(saved), saved)
    optimizer = build_optimizer(saved, chunks)
    checkpointing.load_optimizer(ckpt, chunks, optimizer, "dp_reshardable")
    sharded = optimizer.sharded_state_dict(
        checkpointing.model_sharded_state_dict(chunks),
        metadata=checkpointing.optimizer_metadata("fully_reshardable"),
    )
    dist_checkpointing.save(sharded, str(tmp / checkpointing.OPTIMIZER_DIR))
    del sharded, optimizer, chunks
    gc.collect()
    collectives.barrier()  # every rank's part of the optimizer state is on disk
    if collectives.group_rank() == 0:
        _finish_copy(ckpt, tmp, out, state)
    collectives.barrier()
    return out


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copy2(src, dst)


def _finish_copy(ckpt: Path, tmp: Path, out: Path, state: dict) -> None:
    """Rank 0: everything but optimizer/ from `ckpt`, the new trainer state, rename, `latest`."""
    for entry in ckpt.iterdir():
        if entry.name in (checkpointing.OPTIMIZER_DIR, checkpointing.TRAINER_STATE):
            continue
        if entry.is_dir():
            shutil.copytree(entry, tmp / entry.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(tmp / entry.name))
    state = {**state, "optimizer_format": "fully_reshardable", "resharded_from": ckpt.name}
    checkpointing.write_durable(tmp / checkpointing.TRAINER_STATE, json.dumps(state, indent=2))
    checkpointing.fsync_dir(tmp)
    if out.exists():  # an older copy (the directory was checked incomplete or is replaced)
        shutil.rmtree(out)
    tmp.rename(out)
    latest = out.parent / checkpointing.LATEST
    same_dir = out.parent.resolve() == ckpt.parent.resolve()
    if same_dir and latest.is_file() and latest.read_text().strip() == ckpt.name:
        pointer = out.parent / f".{checkpointing.LATEST}.tmp"
        checkpointing.write_durable(pointer, out.name + "\n")
        pointer.replace(latest)
    checkpointing.fsync_dir(out.parent)
    log.info("wrote %s (fully_reshardable: loads at any tp/pp/dp)", out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="reshard_checkpoint",
        description="Convert a dp_reshardable training checkpoint into a fully_reshardable copy "
        "that resumes at any TP/PP/DP layout. Launch it with a multiple of the saved tp x pp "
        "processes (e.g. the saved process count): torchrun --nproc-per-node N or srun -n N. "
        "A training run does this itself when its process count allows.",
    )
    parser.add_argument("checkpoint", help="a save directory (its `latest`) or an iter_* dir")
    parser.add_argument(
        "--output",
        help=f"the new checkpoint directory (default: <iter>{SUFFIX} beside the input, and "
        "`latest` points to it when it pointed to the input)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """`tools/reshard_checkpoint.py`; bad input raises (run_cli: one line, exit 2)."""
    from megatron_opdlm.runtime import distributed

    args = parse_args(argv)
    ckpt = checkpointing.resolve_training_checkpoint(args.checkpoint)
    out = Path(args.output).absolute() if args.output else converted_path(ckpt)
    if out.exists():
        raise UsageError(str(out), "exists already", "remove it or pass another --output")
    state = checkpointing.read_trainer_state(ckpt)
    if not checkpointing.is_dp_sharded(ckpt):
        log.info("%s already loads at any layout (optimizer format %s): nothing to do", ckpt,
                 state.get("optimizer_format", checkpointing.LEGACY_OPTIMIZER_FORMAT))  # fmt: skip
        return 0
    check_process_count(ckpt, distributed.read_launch_env().world_size)
    saved = _saved_job(ckpt)
    distributed.initialize(saved.parallel, seed=saved.train.seed)
    try:
        convert(ckpt, out)
    finally:
        distributed.shutdown()
    return 0


def console_main() -> None:
    """`opdlm-reshard-checkpoint`: main() with bad input as one line and exit status 2."""
    from megatron_opdlm.cli_errors import run_cli

    run_cli(main)


if __name__ == "__main__":
    console_main()
