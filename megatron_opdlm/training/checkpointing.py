"""Training checkpoints: student, optimizer, RNG of every rank, data position, step, config.

    <save_dir>/latest                    "iter_0000012" (updated last, by rename)
    <save_dir>/iter_0000012/
        opdlm_model.yaml, model/,        the student in the conversion format (checkpoint_io):
        tokenizer/                       export and evaluation read a training checkpoint as is
        optimizer/                       dist_checkpointing of the Megatron optimizer state
                                         (distributed optimizer: fully_reshardable format)
        rng/rank_<r>.pt                  python / numpy / torch / Megatron-tracker RNG states
        trainer_state.json               steps, prompt-order position, layout it was saved at
        config.yaml                      the resolved JobConfig of the run

Model and optimizer are layout-free (resharded on load: another TP/PP/DP works). RNG states are
per rank and restored only at the same layout (otherwise the run re-seeds from the step and
says so). A checkpoint is written under `.iter_XXXXXXX.tmp` and renamed when complete, then
`latest` is replaced; a crash at any point leaves the previous checkpoint and pointer intact.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_opdlm import config_base
from megatron_opdlm.config import JobConfig
from megatron_opdlm.conversion import checkpoint_io
from megatron_opdlm.runtime import collectives
from megatron_opdlm.runtime.logging import get_logger
from megatron_opdlm.training.optimizer import unwrap

log = get_logger(__name__)

TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
MODEL_DIR = checkpoint_io.MODEL_DIR
OPTIMIZER_DIR = "optimizer"
RNG_DIR = "rng"
LATEST = "latest"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def iteration_name(rollout_step: int) -> str:
    return f"iter_{rollout_step:07d}"


def _rank() -> int:
    return collectives.group_rank()


def _barrier() -> None:
    collectives.barrier()


def _agree_on_error(message: str | None) -> None:
    """Raise the same ValueError on every rank when any rank reports a problem."""
    message = next((m for m in collectives.gather_strings(message) if m), None)
    if message:
        raise ValueError(message)


def model_sharded_state_dict(chunks) -> dict:
    """Same nesting as checkpoint_io (so `model/` loads with load_model_checkpoint)."""
    if len(chunks) == 1:
        return unwrap(chunks[0]).sharded_state_dict()
    return {f"chunk{i}": unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(chunks)}


def resolve_training_checkpoint(path: str | Path) -> Path:
    """The iteration directory of `path` (a save_dir with `latest`, or an iteration dir).

    ValueError when it is not a training checkpoint: call before any model is built.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint.load={str(path)!r} does not exist")
    ckpt = checkpoint_io.resolve_checkpoint_dir(path)
    missing = [
        name for name in (TRAINER_STATE, MODEL_DIR, OPTIMIZER_DIR, checkpoint_io.META_FILE)
        if not (ckpt / name).exists()
    ]  # fmt: skip
    if missing:
        raise ValueError(
            f"{ckpt} is not a training checkpoint (missing {missing}); pass a save directory "
            "with a `latest` file or one of its iter_XXXXXXX directories (a converted model "
            "goes in checkpoint.teacher / checkpoint.student_init instead)"
        )
    return ckpt


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / TRAINER_STATE).read_text())


def capture_rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def layout_signature(job: JobConfig) -> dict[str, int]:
    world = collectives.group_size()
    return {"world_size": world, "tp": job.parallel.tp, "pp": job.parallel.pp,
            "vpp": job.parallel.vpp or 0}  # fmt: skip


def save_checkpoint(
    save_dir: str | Path,
    rollout_step: int,
    chunks,
    optimizer,
    trainer_state: dict[str, Any],
    job: JobConfig,
) -> Path:
    """Write iteration `rollout_step` completely, then point `latest` at it; collective."""
    from megatron.core import dist_checkpointing

    save_dir = Path(save_dir).absolute()
    final = save_dir / iteration_name(rollout_step)
    tmp = save_dir / f".{final.name}.tmp"
    error = None
    if _rank() == 0:
        try:
            save_dir.mkdir(parents=True, exist_ok=True)
            for stale in save_dir.glob(".iter_*.tmp"):
                shutil.rmtree(stale)  # left by an interrupted save
            for sub in (MODEL_DIR, OPTIMIZER_DIR, RNG_DIR):
                (tmp / sub).mkdir(parents=True)
        except OSError as exc:
            error = f"cannot create checkpoint directory {tmp}: {exc}"
    _agree_on_error(error)
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(tmp / MODEL_DIR))
    optimizer_state = optimizer.sharded_state_dict(
        model_sharded_state_dict(chunks), metadata=OPTIMIZER_METADATA
    )
    dist_checkpointing.save(optimizer_state, str(tmp / OPTIMIZER_DIR))
    torch.save(capture_rng_state(), tmp / RNG_DIR / f"rank_{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        checkpoint_io.write_model_meta(tmp, job.model, job.diffusion)
        _copy_tokenizer(job, tmp)
        config_base.save_yaml(job, tmp / CONFIG_FILE)
        state = {**trainer_state, "rollout_step": rollout_step, "layout": layout_signature(job)}
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
        if final.exists():  # the same step saved again (e.g. a resumed run that stopped at once)
            shutil.rmtree(final)
        tmp.rename(final)
        pointer = save_dir / f".{LATEST}.tmp"
        pointer.write_text(final.name + "\n")
        pointer.replace(save_dir / LATEST)
        _prune(save_dir, job.checkpoint.keep_last, keep=final.name)
        log.info("saved checkpoint %s", final)
    _barrier()
    return final


def _copy_tokenizer(job: JobConfig, ckpt: Path) -> None:
    """The run's tokenizer beside the student (export and evaluation read it from there)."""
    source = job.data.tokenizer
    if source is None and job.checkpoint.teacher is not None:
        bundled = checkpoint_io.resolve_checkpoint_dir(job.checkpoint.teacher) / "tokenizer"
        source = str(bundled) if bundled.is_dir() else None
    if source is not None:
        checkpoint_io.copy_tokenizer(source, ckpt / checkpoint_io.TOKENIZER_DIR)


def _prune(save_dir: Path, keep_last: int, keep: str) -> None:
    iterations = sorted(p for p in save_dir.glob("iter_*") if p.is_dir())
    for old in iterations[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path, chunks, optimizer, job: JobConfig) -> dict[str, Any]:
    """Load student, optimizer and (same layout only) RNG states; returns the trainer state."""
    from megatron.core import dist_checkpointing

    ckpt = resolve_training_checkpoint(path)
    checkpoint_io.load_model_checkpoint(chunks, ckpt)
    optimizer_template = optimizer.sharded_state_dict(
        model_sharded_state_dict(chunks), is_loading=True, metadata=OPTIMIZER_METADATA
    )
    optimizer.load_state_dict(
        dist_checkpointing.load(optimizer_template, str(ckpt / OPTIMIZER_DIR))
    )
    state = read_trainer_state(ckpt)
    rng_file = ckpt / RNG_DIR / f"rank_{_rank()}.pt"
    if state.get("layout") == layout_signature(job) and rng_file.is_file():
        restore_rng_state(torch.load(rng_file, weights_only=False))
        state["rng_restored"] = True
    else:
        log.warning(
            "checkpoint %s was saved at layout %s, this run is %s: RNG states are re-seeded "
            "from the step (rollouts stay reproducible, their samples differ from an "
            "uninterrupted run at the old layout)",
            ckpt, state.get("layout"), layout_signature(job),
        )  # fmt: skip
        state["rng_restored"] = False
    log.info("resumed from %s (rollout step %d)", ckpt, state["rollout_step"])
    return state
