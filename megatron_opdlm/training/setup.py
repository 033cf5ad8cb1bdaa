"""Everything a run needs before its first step, with bad input refused before any work.

Order: config checks that involve the world size -> the `--load` directory -> tokenizer and
prompt files -> teacher and student models -> DDP and optimizer. Only the last two cost time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_opdlm import checkpoint_layout
from megatron_opdlm.config import JobConfig
from megatron_opdlm.data.prompts import PromptDataset, load_prompts
from megatron_opdlm.models.builder import build_student, build_teacher, copy_weights
from megatron_opdlm.models.vocab import init_mask_token_row
from megatron_opdlm.runtime.logging import get_logger
from megatron_opdlm.training import checkpointing
from megatron_opdlm.training.optimizer import build_optimizer, wrap_ddp

log = get_logger(__name__)

ROLLOUT_MODES = ("opdlm", "opdlm_off")
TEACHER_MODES = ("opdlm", "opdlm_off", "offpolicy")


def check_job(job: JobConfig, world_size: int) -> None:
    """Conflicts between sections that only the trainer knows about (ValueError)."""
    job.validate(world_size)
    train, dp = job.train, world_size // (job.parallel.tp * job.parallel.pp)
    if train.prompts_per_rollout % train.global_batch_size:
        raise ValueError(
            f"train.prompts_per_rollout={train.prompts_per_rollout} is not a multiple of "
            f"train.global_batch_size={train.global_batch_size}: each rollout batch is split "
            "into whole optimizer steps"
        )
    if train.global_batch_size % (dp * train.micro_batch_size):
        raise ValueError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by data-parallel "
            f"size {dp} x train.micro_batch_size={train.micro_batch_size}"
        )
    if job.data.train_prompts is None:
        raise ValueError("data.train_prompts is not set: give a JSONL file of prompts")
    if job.distill.mode in ROLLOUT_MODES and job.parallel.sequence_parallel:
        raise ValueError(
            f"distill.mode={job.distill.mode} rolls out with the student, and the sampler does not "
            "support parallel.sequence_parallel=true; turn sequence parallelism off"
        )
    if job.distill.mode == "mdlm_sft" and job.distill.divergence != "forward_kl":
        log.warning("distill.mode=mdlm_sft trains with cross-entropy; distill.divergence is unused")
    if job.precision.dtype == "fp16" and job.train.nan_policy == "skip":
        log.info("fp16: the loss scaler also skips steps with inf/NaN gradients")


def resolve_resume(job: JobConfig) -> Path | None:
    """The checkpoint to resume from: checkpoint.load, else save_dir/latest if it exists."""
    if job.checkpoint.load is not None:
        return checkpointing.resolve_training_checkpoint(job.checkpoint.load)
    save_dir = job.checkpoint.save_dir
    if save_dir is not None and (Path(save_dir) / checkpointing.LATEST).is_file():
        return checkpointing.resolve_training_checkpoint(save_dir)
    return None


def adopt_teacher_model_config(job: JobConfig) -> None:
    """A converted teacher defines the architecture: take its ModelConfig."""
    if job.checkpoint.teacher is None:
        return
    model_cfg, _ = checkpoint_layout.read_model_meta(job.checkpoint.teacher)
    if model_cfg != job.model:
        log.info("model config taken from the teacher checkpoint %s", job.checkpoint.teacher)
    job.model = model_cfg


def load_tokenizer(job: JobConfig):
    """data.tokenizer, else the tokenizer saved with the teacher checkpoint, else None."""
    from megatron_opdlm.data.tokenizer import load_tokenizer as load

    if job.data.tokenizer is not None:
        return load(job.data.tokenizer)
    if job.checkpoint.teacher is not None:
        bundled = checkpoint_layout.resolve_checkpoint_dir(job.checkpoint.teacher) / "tokenizer"
        if bundled.is_dir():
            return load(bundled)
    return None


def load_datasets(job: JobConfig, tokenizer) -> tuple[PromptDataset, PromptDataset | None]:
    kwargs = dict(
        vocab_size=job.model.vocab_size,
        eos_token_ids=job.model.eos_token_ids,
        max_prompt_length=job.data.max_prompt_length,
        chat_template=job.data.chat_template,
    )
    need_response = job.distill.mode not in ROLLOUT_MODES
    train = load_prompts(job.data.train_prompts, tokenizer, need_response=need_response, **kwargs)
    held_out = None
    if job.data.eval_prompts is not None:
        held_out = load_prompts(job.data.eval_prompts, tokenizer, **kwargs)
        if job.data.eval_limit:
            held_out.records = held_out.records[: job.data.eval_limit]
        dp = parallel_state.get_data_parallel_world_size()
        if len(held_out) < dp:
            raise ValueError(
                f"data.eval_prompts has {len(held_out)} records, fewer than the {dp} data-parallel "
                "ranks that share them"
            )
    return train, held_out


def _broadcast_over_data_parallel(chunks) -> None:
    """Make randomly initialised weights equal on every data-parallel rank."""
    if parallel_state.get_data_parallel_world_size() == 1:
        return
    group = parallel_state.get_data_parallel_group()
    src = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for chunk in chunks:
            for tensor in chunk.state_dict().values():
                if isinstance(tensor, torch.Tensor):
                    dist.broadcast(tensor, src=src, group=group)


@dataclass
class Models:
    teacher: list[torch.nn.Module] | None
    student: list[torch.nn.Module]  # DDP-wrapped chunks
    optimizer: object


def build_models(job: JobConfig, resuming: bool) -> Models:
    """Teacher (frozen) and student (DDP + optimizer), initialised from checkpoints."""
    needs_teacher = job.distill.mode in TEACHER_MODES or job.data.eval_prompts is not None
    teacher = None
    if needs_teacher or job.checkpoint.student_init is None:
        if job.checkpoint.teacher is not None:
            teacher = build_teacher(job)
            checkpoint_layout.load_model_checkpoint(teacher, job.checkpoint.teacher)
        else:
            log.warning("checkpoint.teacher is not set: the teacher is randomly initialised")
            with torch.random.fork_rng(devices=[]):  # the same random teacher on every build
                torch.manual_seed(job.train.seed)
                teacher = build_teacher(job)
            _broadcast_over_data_parallel(teacher)
    student = build_student(job)
    if not resuming:
        if job.checkpoint.student_init is not None:
            checkpoint_layout.load_model_checkpoint(student, job.checkpoint.student_init)
        else:
            copy_weights(teacher, student)
        init_mask_token_row(student, job.model)
    ddp = wrap_ddp(student, job)
    optimizer = build_optimizer(job, ddp)
    if not needs_teacher:
        teacher = None  # only used to initialise the student
    return Models(teacher=teacher, student=ddp, optimizer=optimizer)
