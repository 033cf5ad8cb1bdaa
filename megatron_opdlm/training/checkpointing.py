"""Training checkpoints: student, optimizer, RNG of every rank, data position, step, config.

    <save_dir>/latest                    "iter_0000012" (updated last, by rename, fsynced)
    <save_dir>/iter_0000012/             12 rollout steps done (iter_0000012_003: and 3
                                         optimizer steps of the 13th, saved by a stop)
        opdlm_model.yaml, model/,        the student in the checkpoint layout
        tokenizer/                       (checkpoint_layout): export and evaluation read a
                                         training checkpoint as is
        optimizer/                       dist_checkpointing of the Megatron optimizer state
        rng/rank_<r>.pt                  python / numpy / torch / Megatron-tracker RNG states
        rollout/rank_<r>.pt              only mid-step: this rank's rollout batch of the step
        trainer_state.json               steps, prompt-order position, layout, optimizer format
        config.yaml                      the resolved JobConfig of the run

Optimizer format (checkpoint.optimizer_format, recorded in trainer_state.json): with the
distributed optimizer, `dp_reshardable` writes each rank's own shard (no cross-DP gather; loads
at another DP size, same TP/PP); `fully_reshardable` gathers the whole state on every DP rank
at save time (loads at any TP/PP/DP). Without the distributed optimizer both are layout-free.
A dp_reshardable checkpoint resumed at another TP/PP/VPP is first converted once into a
fully_reshardable copy `iter_XXXXXXX_fully_reshardable/` beside it (training/reshard.py: by the
trainer itself when its world size allows, else by tools/reshard_checkpoint.py).
The model is always layout-free. RNG states are restored only at the same layout (otherwise the
run re-seeds from the step and says so).

A checkpoint is written under `.iter_XXXXXXX.tmp` and renamed when complete, then `latest` is
replaced; a crash at any point leaves the previous checkpoint and pointer intact. A step saved
again is moved aside to `.iter_XXXXXXX.old` only once the new one is complete (resolving
`latest` falls back to it if a crash hits between the two renames). With checkpoint.async_save
the tensors are written by megatron-core's async strategy while training goes on; the save is
completed (renamed, pointed to) before the next save and before exit (CheckpointWriter).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from megatron_opdlm import checkpoint_layout, config_base
from megatron_opdlm.config import JobConfig
from megatron_opdlm.runtime import collectives
from megatron_opdlm.runtime.logging import get_logger
from megatron_opdlm.training.optimizer import unwrap

log = get_logger(__name__)

TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
MODEL_DIR = checkpoint_layout.MODEL_DIR
OPTIMIZER_DIR = "optimizer"
RNG_DIR = "rng"
ROLLOUT_DIR = "rollout"
LATEST = checkpoint_layout.LATEST
# Checkpoints written before the format was recorded used fully_reshardable.
LEGACY_OPTIMIZER_FORMAT = "fully_reshardable"


def iteration_name(rollout_step: int, within_step: int = 0) -> str:
    """`iter_0000012`, or `iter_0000012_003` for a stop after 3 optimizer steps of step 13."""
    name = f"iter_{rollout_step:07d}"
    return f"{name}_{within_step:03d}" if within_step else name


def _rank() -> int:
    return collectives.group_rank()


def agree_on_error(message: str | None) -> None:
    """Raise the same ValueError on every rank when any rank reports a problem."""
    message = next((m for m in collectives.gather_strings(message) if m), None)
    if message:
        raise ValueError(message)


def write_durable(path: Path, text: str) -> None:
    """Write `text` to `path` and fsync it (metadata a resume depends on)."""
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_sharded_state_dict(chunks) -> dict:
    """Same nesting as checkpoint_layout (so `model/` loads with load_model_checkpoint)."""
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
    ckpt = checkpoint_layout.resolve_checkpoint_dir(path)
    missing = [
        name for name in (TRAINER_STATE, MODEL_DIR, OPTIMIZER_DIR, checkpoint_layout.META_FILE)
        if not (ckpt / name).exists()
    ]  # fmt: skip
    if missing:
        raise ValueError(
            f"{ckpt} is not a training checkpoint (missing {missing}); pass a save directory "
            "with a `latest` file or one of its iter_XXXXXXX directories (a converted model "
            "goes in checkpoint.teacher / checkpoint.student_init instead)"
        )
    return ckpt


def is_training_checkpoint(path: Path) -> bool:
    try:
        return resolve_training_checkpoint(path) == path
    except ValueError:
        return False


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / TRAINER_STATE).read_text())


def is_dp_sharded(ckpt: Path) -> bool:
    """`ckpt`'s optimizer state is in dp_reshardable buckets (tied to its tp/pp/vpp): the
    distributed optimizer's format; a plain optimizer's state is layout-free in any format."""
    state = read_trainer_state(ckpt)
    fmt = state.get("optimizer_format", LEGACY_OPTIMIZER_FORMAT)
    if fmt != "dp_reshardable" or not state.get("optimizer_saved", True):
        return False
    saved = yaml.safe_load((ckpt / CONFIG_FILE).read_text()) or {}
    return bool((saved.get("parallel") or {}).get("use_distributed_optimizer"))


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


def optimizer_metadata(optimizer_format: str) -> dict[str, str]:
    return {"distrib_optim_sharding_type": optimizer_format}


def _optimizer_has_state(optimizer) -> bool:
    """False before the first optimizer step (same on every rank: they step together).

    Such a checkpoint (a stop before any step) stores no optimizer state, and loading it keeps
    the fresh optimizer: priming one to save it would count an Adam step the run never took.
    """
    from megatron_opdlm.training.optimizer import _inner_optimizers

    return any(
        len(getattr(inner, "optimizer", inner).state) for inner in _inner_optimizers(optimizer)
    )


class CheckpointWriter:
    """Saves training checkpoints, synchronously or with megatron-core's async strategy.

    At most one save is in flight: `save` completes the previous one first; `finalize()` (also
    collective) completes it before exit. Completing = the async writers are done on every rank,
    then rank 0 writes the metadata files, renames the directory and replaces `latest`.
    """

    def __init__(self, async_save: bool = False):
        self.async_save = async_save
        self._queue = None
        self._pending: dict[str, Any] | None = None  # what completing the save in flight needs
        self._pruner: threading.Thread | None = None  # rank 0: deletes checkpoints past keep_last

    def _join_pruner(self) -> None:
        if self._pruner is not None:
            self._pruner.join()
            self._pruner = None

    def save(
        self,
        save_dir: str | Path,
        rollout_step: int,
        chunks,
        optimizer,
        trainer_state: dict[str, Any],
        job: JobConfig,
        within_step: int = 0,
        partial_rollout: Any = None,
    ) -> Path:
        """Write iteration (rollout_step, within_step); collective. Returns its final path."""
        from megatron.core import dist_checkpointing

        self.finalize()
        save_dir = Path(save_dir).absolute()
        final = save_dir / iteration_name(rollout_step, within_step)
        tmp = save_dir / f".{final.name}.tmp"
        error = None
        if _rank() == 0:
            try:
                save_dir.mkdir(parents=True, exist_ok=True)
                for stale in save_dir.glob(".iter_*.tmp"):
                    shutil.rmtree(stale)  # left by an interrupted save
                for sub in (MODEL_DIR, OPTIMIZER_DIR, RNG_DIR, ROLLOUT_DIR):
                    (tmp / sub).mkdir(parents=True)
            except OSError as exc:
                error = f"cannot create checkpoint directory {tmp}: {exc}"
        agree_on_error(error)
        fmt = job.checkpoint.optimizer_format
        model_state = model_sharded_state_dict(chunks)
        has_state = _optimizer_has_state(optimizer)
        optimizer_state = None
        if has_state:
            optimizer_state = optimizer.sharded_state_dict(
                model_sharded_state_dict(chunks), metadata=optimizer_metadata(fmt)
            )
        if partial_rollout is not None:
            torch.save(partial_rollout, tmp / ROLLOUT_DIR / f"rank_{_rank()}.pt")
        torch.save(capture_rng_state(), tmp / RNG_DIR / f"rank_{_rank()}.pt")
        state = {**trainer_state, "rollout_step": rollout_step, "within_step": within_step,
                 "layout": layout_signature(job), "optimizer_format": fmt,
                 "optimizer_saved": has_state}  # fmt: skip
        self._pending = {"tmp": tmp, "final": final, "job": job, "state": state}
        parts = [(model_state, MODEL_DIR)]
        if optimizer_state is not None:
            parts.append((optimizer_state, OPTIMIZER_DIR))
        if not self.async_save:
            for state_dict, sub in parts:
                dist_checkpointing.save(state_dict, str(tmp / sub))
            self._complete()
            return final
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        if self._queue is None:
            self._queue = AsyncCallsQueue(persistent=False)
        for state_dict, sub in parts:
            # "mcore": megatron-core's own forked writer; "nvrx" needs nvidia-resiliency-ext.
            request = dist_checkpointing.save(
                state_dict, str(tmp / sub), async_sharded_save=True, async_strategy="mcore"
            )
            self._queue.schedule_async_request(request)
        log.info("checkpoint %s: writing in the background", final.name)
        return final

    def poll(self) -> None:
        """Complete the save in flight if its writers are done on every rank; collective."""
        if self._queue is not None and self._pending is not None:
            self._queue.maybe_finalize_async_calls(blocking=False)
            if self._queue.get_num_unfinalized_calls() == 0:
                self._complete()

    def finalize(self) -> None:
        """Wait for the save in flight and complete it; collective (a no-op when none)."""
        if self._pending is None:
            return
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=True)
        self._complete()

    def close(self, abort: bool = False) -> None:
        """Complete the save in flight (collective); `abort` (an error is unwinding, maybe on
        one rank only) drops it instead: its `.tmp` directory is removed by the next save."""
        if abort:
            self._pending = None
        else:
            self.finalize()
        if self._queue is not None:
            self._queue.close(abort=abort)
            self._queue = None
        self._join_pruner()

    def _complete(self) -> None:
        pending, self._pending = self._pending, None
        tmp, final, job, state = pending["tmp"], pending["final"], pending["job"], pending["state"]
        collectives.barrier()  # every rank's shards, RNG and rollout files are on disk
        if _rank() == 0:
            checkpoint_layout.write_model_meta(tmp, job.model, job.diffusion)
            _copy_tokenizer(job, tmp)
            config_base.save_yaml(job, tmp / CONFIG_FILE)
            write_durable(tmp / TRAINER_STATE, json.dumps(state, indent=2))
            fsync_dir(tmp)
            save_dir = final.parent
            old = save_dir / f".{final.name}.old"
            if final.exists():  # the same step saved again: keep it until the new one is in
                if old.exists():
                    shutil.rmtree(old)
                final.rename(old)
            tmp.rename(final)
            pointer = save_dir / f".{LATEST}.tmp"
            write_durable(pointer, final.name + "\n")
            pointer.replace(save_dir / LATEST)
            fsync_dir(save_dir)
            if old.exists():
                shutil.rmtree(old)
            log.info("saved checkpoint %s", final)
            # Deleting old checkpoints (minutes at 70B on a parallel file system) must not hold
            # every rank at the barrier: a thread does it while training goes on.
            self._join_pruner()
            self._pruner = threading.Thread(
                target=_prune, args=(save_dir, job.checkpoint.keep_last, final.name)
            )
            self._pruner.start()
        collectives.barrier()


def _copy_tokenizer(job: JobConfig, ckpt: Path) -> None:
    """The run's tokenizer beside the student (export and evaluation read it from there)."""
    source = job.data.tokenizer
    if source is None and job.checkpoint.teacher is not None:
        teacher = checkpoint_layout.resolve_checkpoint_dir(job.checkpoint.teacher)
        bundled = teacher / checkpoint_layout.TOKENIZER_DIR
        source = str(bundled) if bundled.is_dir() else None
    if source is not None:
        checkpoint_layout.copy_tokenizer(source, ckpt / checkpoint_layout.TOKENIZER_DIR)


def _prune(save_dir: Path, keep_last: int, keep: str) -> None:
    iterations = sorted(p for p in save_dir.glob("iter_*") if p.is_dir())
    for old in iterations[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def check_resume_layout(ckpt: Path, job: JobConfig) -> None:
    """ValueError when this run's layout cannot load `ckpt` (before any weight is read).

    A dp_reshardable optimizer saved at another tp/pp/vpp is refused here; the trainer converts
    such a checkpoint first (training/reshard.py), or names the tool that does.
    """
    state = read_trainer_state(ckpt)
    saved, here = state.get("layout") or {}, layout_signature(job)
    model_parallel = {k: saved.get(k) for k in ("tp", "pp", "vpp")}
    same_model_parallel = model_parallel == {k: here[k] for k in ("tp", "pp", "vpp")}
    if state.get("within_step") and saved != here:
        raise ValueError(
            f"{ckpt} was saved in the middle of a rollout step at layout {saved}; its rollout "
            f"batches are per data-parallel rank, so resume it at that layout (this run: {here})"
        )
    if not same_model_parallel and is_dp_sharded(ckpt):
        from megatron_opdlm.training import reshard

        raise ValueError(
            f"{ckpt} holds the distributed optimizer in dp_reshardable format, saved at "
            f"{model_parallel}; it loads at another DP size but not at {here}: convert it once "
            f"with `{reshard.tool_command(ckpt, saved.get('world_size', 1))}` (or start the run "
            "with a multiple of the saved tp x pp processes: it converts it itself)"
        )


def load_optimizer(ckpt: Path, chunks, optimizer, optimizer_format: str) -> None:
    """Load `ckpt`'s optimizer state, saved in `optimizer_format`, into `optimizer`."""
    from megatron.core import dist_checkpointing

    template = optimizer.sharded_state_dict(
        model_sharded_state_dict(chunks),
        is_loading=True,
        metadata=optimizer_metadata(optimizer_format),
    )
    optimizer.load_state_dict(dist_checkpointing.load(template, str(ckpt / OPTIMIZER_DIR)))


def load_checkpoint(path: str | Path, chunks, optimizer, job: JobConfig) -> dict[str, Any]:
    """Load student, optimizer and (same layout only) RNG states; returns the trainer state.

    A mid-step checkpoint also returns this rank's rollout batch as state["partial_rollout"].
    """
    ckpt = resolve_training_checkpoint(path)
    check_resume_layout(ckpt, job)
    state = read_trainer_state(ckpt)
    checkpoint_layout.load_model_checkpoint(chunks, ckpt)
    fmt = state.get("optimizer_format", LEGACY_OPTIMIZER_FORMAT)
    if state.get("optimizer_saved", True):
        load_optimizer(ckpt, chunks, optimizer, fmt)
    else:
        log.info("%s was saved before the first optimizer step: the optimizer starts fresh", ckpt)
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
    if state.get("within_step"):
        rollout_file = ckpt / ROLLOUT_DIR / f"rank_{_rank()}.pt"
        state["partial_rollout"] = torch.load(rollout_file, weights_only=False)
    log.info("resumed from %s (rollout step %d)", ckpt, state["rollout_step"])
    return state
