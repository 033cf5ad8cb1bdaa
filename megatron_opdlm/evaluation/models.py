"""Models under evaluation: a checkpoint's weights and how its sampler decodes.

An AR checkpoint (its opdlm_model.yaml has `diffusion: null`, e.g. the converted teacher) decodes
as the block-diffusion sampler with block size 1, one round per block and token shift on: that is
plain greedy AR decoding with a KV cache. A diffusion checkpoint (a trained student) decodes with
its own DiffusionConfig. `as_diffusion` evaluates an AR checkpoint as an untrained student (the
"student before OPDLM": the teacher's weights under block-causal attention).

Every model is built with the student's layer spec (explicit, arbitrary masks): the same weights
then serve the sampler, the packed training rows and the causal scoring forwards, whatever the
attention backend does with a "causal" mask type.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_opdlm.config import (
    DiffusionConfig,
    JobConfig,
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
)

AR_DIFFUSION = DiffusionConfig(block_size=1, token_shift=True)


@dataclass
class EvalModel:
    """One model to evaluate (or the teacher that scores the others)."""

    name: str
    chunks: list[torch.nn.Module]
    model_cfg: ModelConfig
    diffusion_cfg: DiffusionConfig  # how the sampler decodes it (AR_DIFFUSION for an AR model)
    is_ar: bool
    checkpoint: str | None = None
    training_tokens: int | None = None
    info: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "ar" if self.is_ar else "diffusion"


def job_for(
    model_cfg: ModelConfig,
    diffusion_cfg: DiffusionConfig,
    parallel: ParallelConfig | None = None,
    precision: PrecisionConfig | None = None,
) -> JobConfig:
    job = JobConfig()
    job.model = copy.deepcopy(model_cfg)
    job.diffusion = copy.deepcopy(diffusion_cfg)
    job.parallel = copy.deepcopy(parallel) if parallel is not None else ParallelConfig()
    job.precision = copy.deepcopy(precision) if precision is not None else PrecisionConfig()
    # FP8 belongs to the student's training GEMMs only: evaluation GEMMs have few, unaligned rows
    # and DP ranks score different numbers of batches (an amax reduction over them would hang).
    job.precision.fp8, job.precision.fp8_teacher = "none", False
    job.rollout.steps_per_block = job.diffusion.block_size  # evaluation decodes 1 token/round
    return job


def from_chunks(
    name: str,
    chunks: list[torch.nn.Module],
    model_cfg: ModelConfig,
    diffusion_cfg: DiffusionConfig | None,
    checkpoint: str | None = None,
    training_tokens: int | None = None,
) -> EvalModel:
    """Wrap already built (and loaded) chunks; `diffusion_cfg` None means an AR model."""
    is_ar = diffusion_cfg is None
    return EvalModel(
        name=name,
        chunks=chunks,
        model_cfg=model_cfg,
        diffusion_cfg=AR_DIFFUSION if is_ar else diffusion_cfg,
        is_ar=is_ar,
        checkpoint=checkpoint,
        training_tokens=training_tokens,
    )


def training_tokens_of(ckpt_dir: str | Path) -> int | None:
    """Training tokens recorded by the trainer in trainer_state.json, when it records them."""
    path = Path(ckpt_dir) / "trainer_state.json"
    if not path.is_file():
        return None
    import json

    state = json.loads(path.read_text())
    for key in ("training_tokens", "consumed_tokens", "tokens_seen"):
        if isinstance(state.get(key), (int, float)):
            return int(state[key])
    return None


def load_eval_model(
    name: str,
    ckpt: str | Path,
    parallel: ParallelConfig | None = None,
    precision: PrecisionConfig | None = None,
    as_diffusion: DiffusionConfig | None = None,
    training_tokens: int | None = None,
) -> EvalModel:
    """Build this rank's chunks for the checkpoint at `ckpt` and load its weights.

    `as_diffusion`: decode an AR checkpoint as a block-diffusion student with this config (an
    error for a checkpoint that already is a diffusion model). Needs Megatron's parallel state
    (runtime.distributed.initialize) with the layout of `parallel`.
    """
    from megatron_opdlm.checkpoint_layout import (
        load_model_checkpoint,
        read_model_meta,
        resolve_checkpoint_dir,
    )
    from megatron_opdlm.models.builder import build_student

    ckpt_dir = resolve_checkpoint_dir(ckpt)
    model_cfg, diffusion_cfg = read_model_meta(ckpt_dir)
    if as_diffusion is not None:
        if diffusion_cfg is not None:
            raise ValueError(
                f"{ckpt_dir} is already a diffusion model (block size {diffusion_cfg.block_size}); "
                "--diffusion-init is for AR checkpoints (the student before training)"
            )
        diffusion_cfg = as_diffusion
    job = job_for(model_cfg, diffusion_cfg or AR_DIFFUSION, parallel, precision)
    job.validate()
    chunks = build_student(job)
    load_model_checkpoint(chunks, ckpt_dir)
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    if training_tokens is None:
        training_tokens = 0 if as_diffusion is not None else training_tokens_of(ckpt_dir)
    return from_chunks(name, chunks, model_cfg, diffusion_cfg, str(ckpt_dir), training_tokens)


def check_compatible(teacher: EvalModel, model: EvalModel) -> None:
    """Teacher and model must share the vocabulary (the teacher scores the model's tokens)."""
    a, b = teacher.model_cfg, model.model_cfg
    if (a.vocab_size, a.padded_vocab_size) != (b.vocab_size, b.padded_vocab_size):
        raise ValueError(
            f"model {model.name!r} has vocabulary {b.vocab_size} (padded {b.padded_vocab_size}) "
            f"but the teacher has {a.vocab_size} (padded {a.padded_vocab_size}); evaluate "
            "models converted from the same tokenizer as the teacher"
        )
