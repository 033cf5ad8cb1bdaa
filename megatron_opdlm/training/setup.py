"""Everything a run needs before its first step, with bad input refused before any work.

Order: config checks that involve the world size -> the `--load` directory -> tokenizer and
prompt files -> teacher and student models -> DDP and optimizer. Only the last two cost time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_opdlm import checkpoint_layout
from megatron_opdlm.config import JobConfig, ModelConfig
from megatron_opdlm.data.prompts import PromptDataset, load_prompts
from megatron_opdlm.models.builder import build_student, build_teacher, copy_weights
from megatron_opdlm.models.vocab import init_mask_token_row
from megatron_opdlm.runtime import collectives
from megatron_opdlm.runtime.logging import get_logger
from megatron_opdlm.training import checkpointing
from megatron_opdlm.training.optimizer import build_optimizer, wrap_ddp

log = get_logger(__name__)

ROLLOUT_MODES = ("opdlm", "opdlm_off")
TEACHER_MODES = ("opdlm", "opdlm_off", "offpolicy")


def check_job(job: JobConfig, world_size: int) -> None:
    """Conflicts between sections that only the trainer knows about (ValueError)."""
    job.validate(world_size)
    check_student_init(job)
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


# ModelConfig fields a job may set differently from its teacher checkpoint: they change neither
# the weights' shapes nor their meaning. Every other field is the architecture of the checkpoint.
RUN_TIME_MODEL_FIELDS = ("mask_token_id", "eos_token_ids", "pad_token_id",
                         "max_position_embeddings", "init_method_std")  # fmt: skip


def explicit_model_fields(model: ModelConfig) -> dict:
    """Fields of job.model that differ from ModelConfig's defaults, i.e. were set by the YAML or
    an override (a value set equal to its default cannot be told apart and counts as unset)."""
    default = ModelConfig()
    return {
        f.name: getattr(model, f.name)
        for f in dataclasses.fields(ModelConfig)
        if getattr(model, f.name) != getattr(default, f.name)
    }


def adopt_teacher_model_config(job: JobConfig) -> None:
    """A converted teacher defines the architecture: take its ModelConfig, merged with the fields
    the job sets explicitly. Run-time fields (RUN_TIME_MODEL_FIELDS) override the teacher's;
    architecture fields that contradict the checkpoint are refused (ValueError naming both)."""
    if job.checkpoint.teacher is None:
        return
    teacher_cfg, _ = checkpoint_layout.read_model_meta(job.checkpoint.teacher)
    explicit = explicit_model_fields(job.model)
    conflicts = [
        f"model.{name}={value!r} (the teacher has {getattr(teacher_cfg, name)!r})"
        for name, value in explicit.items()
        if name not in RUN_TIME_MODEL_FIELDS and value != getattr(teacher_cfg, name)
    ]
    if conflicts:
        raise ValueError(
            f"checkpoint.teacher={job.checkpoint.teacher} defines the architecture, and these "
            f"overrides contradict it: {', '.join(conflicts)}; remove them (only "
            f"{', '.join(RUN_TIME_MODEL_FIELDS)} may differ)"
        )
    overrides = {k: v for k, v in explicit.items() if k in RUN_TIME_MODEL_FIELDS}
    merged = dataclasses.replace(teacher_cfg, **overrides)
    if merged.padded_vocab_size != teacher_cfg.padded_vocab_size:
        raise ValueError(
            f"model.mask_token_id={merged.mask_token_id} changes the padded vocabulary from the "
            f"teacher's {teacher_cfg.padded_vocab_size} rows to {merged.padded_vocab_size}; "
            "convert the teacher with tools/convert_hf_to_megatron.py --mask-token-id "
            f"{merged.mask_token_id} instead"
        )
    merged.validate()
    changed = {k: v for k, v in overrides.items() if v != getattr(teacher_cfg, k)}
    log.info("model config taken from the teacher checkpoint %s%s", job.checkpoint.teacher,
             f", with overrides {changed}" if changed else "")  # fmt: skip
    job.model = merged


def check_student_init(job: JobConfig) -> None:
    """checkpoint.student_init must be a model of this job: the same architecture and, for a
    trained student, the same block size and token shift (its weights were trained for them)."""
    if job.checkpoint.student_init is None:
        return
    init_cfg, init_diffusion = checkpoint_layout.read_model_meta(job.checkpoint.student_init)
    where = f"checkpoint.student_init={job.checkpoint.student_init}"
    differs = [
        f"model.{f.name} {getattr(init_cfg, f.name)!r} vs {getattr(job.model, f.name)!r}"
        for f in dataclasses.fields(ModelConfig)
        if f.name not in RUN_TIME_MODEL_FIELDS[1:]  # the mask token id is part of the weights
        and getattr(init_cfg, f.name) != getattr(job.model, f.name)
    ]
    if differs:
        raise ValueError(
            f"{where} is a different model from the job's ({'; '.join(differs)}); start from a "
            "checkpoint of the same architecture"
        )
    if init_diffusion is None:
        return
    for name in ("block_size", "token_shift"):
        trained, wanted = getattr(init_diffusion, name), getattr(job.diffusion, name)
        if trained != wanted:
            raise ValueError(
                f"{where} was trained with diffusion.{name}={trained!r}, the job sets "
                f"diffusion.{name}={wanted!r}; set diffusion.{name}={trained!r} to continue it"
            )


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


def check_mask_token(job: JobConfig, tokenizer) -> None:
    """A named mask token must be an unused row: a real token would be both mask and text."""
    mask = job.model.mask_token_id
    if mask is not None and tokenizer is not None and mask < tokenizer.vocab_size:
        raise ValueError(
            f"model.mask_token_id={mask} is a real token of the tokenizer (it has "
            f"{tokenizer.vocab_size}); name an unused row in [{tokenizer.vocab_size}, "
            f"{job.model.padded_vocab_size}) or leave it unset to add a row"
        )


def load_datasets(job: JobConfig, tokenizer) -> tuple[PromptDataset, PromptDataset | None]:
    check_mask_token(job, tokenizer)
    kwargs = dict(
        vocab_size=job.model.vocab_size,
        eos_token_ids=job.model.eos_token_ids,
        max_prompt_length=job.data.max_prompt_length,
        chat_template=job.data.chat_template,
        chat_template_kwargs=job.data.chat_template_kwargs,
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
    src = torch.distributed.get_global_rank(group, 0)
    with torch.no_grad():
        for chunk in chunks:
            for tensor in chunk.state_dict().values():
                if isinstance(tensor, torch.Tensor):
                    collectives.broadcast_tensor_(tensor, src=src, group=group)


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
        trained_student = False
        if job.checkpoint.student_init is not None:
            checkpoint_layout.load_model_checkpoint(student, job.checkpoint.student_init)
            _, init_diffusion = checkpoint_layout.read_model_meta(job.checkpoint.student_init)
            trained_student = init_diffusion is not None
        else:
            copy_weights(teacher, student)
        if not trained_student:  # a trained student keeps its learned mask-token row
            init_mask_token_row(student, job.model)
    ddp = wrap_ddp(student, job)
    optimizer = build_optimizer(job, ddp)
    if not needs_teacher:
        teacher = None  # only used to initialise the student
    return Models(teacher=teacher, student=ddp, optimizer=optimizer)
