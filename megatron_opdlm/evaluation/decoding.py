"""Greedy decoding settings of the evaluation, and timed generation through the rollout engine.

Settings (the paper's evaluation): greedy (temperature 0) decoding, at most B rounds per block of
B tokens, with
- static: exactly one token unmasked per round (1 token per forward, the quality setting);
- dynamic_<t>: every position whose confidence exceeds t, at least one (the speed setting).
An AR model has one setting, `ar`: block size 1, one round, token shift (plain AR decoding).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from megatron_opdlm.config import RolloutConfig
from megatron_opdlm.diffusion.engine import generate_rollout
from megatron_opdlm.diffusion.rollout_types import RolloutBatch
from megatron_opdlm.evaluation.models import EvalModel

DEFAULT_THRESHOLDS = (0.95, 0.9, 0.8)


@dataclass(frozen=True)
class DecodingSetting:
    name: str  # "ar" | "static" | "dynamic_0.9" ...
    remasking: str  # "static" | "dynamic"
    threshold: float = 0.9

    def rollout_config(self, block_size: int, max_new_tokens: int) -> RolloutConfig:
        cfg = RolloutConfig(
            steps_per_block=block_size,
            remasking=self.remasking,
            threshold=self.threshold,
            temperature=0.0,
            max_new_tokens=max_new_tokens,
            use_kv_cache=True,
        )
        cfg.validate()
        return cfg


def decoding_settings(model: EvalModel, thresholds=DEFAULT_THRESHOLDS) -> list[DecodingSetting]:
    """The settings a model is evaluated under: `ar` for AR models, static + dynamic otherwise."""
    if model.is_ar:
        return [DecodingSetting("ar", "static")]
    for t in thresholds:
        if not 0.0 < t <= 1.0:
            raise ValueError(f"dynamic threshold {t} must be in (0, 1]")
    return [DecodingSetting("static", "static")] + [
        DecodingSetting(f"dynamic_{t:g}", "dynamic", float(t)) for t in thresholds
    ]


def quality_setting(model: EvalModel) -> DecodingSetting:
    """The setting QA accuracy and the on-policy KL use: `ar`, or static (1 token per round)."""
    return decoding_settings(model)[0]


@dataclass
class Generation:
    """Greedy responses of one model under one setting, with their cost."""

    setting: str
    batches: list[RolloutBatch]
    seconds: float  # wall-clock time inside the rollout engine

    @property
    def tokens(self) -> int:
        return int(sum(int(b.response_valid.sum()) for b in self.batches))

    @property
    def forwards(self) -> int:
        return int(sum(int(b.num_forwards.sum()) for b in self.batches))

    def responses(self) -> list[list[int]]:
        """Each sequence's response tokens up to and including its end of sequence."""
        out = []
        for batch in self.batches:
            for row, valid in zip(batch.response_tokens, batch.response_valid, strict=True):
                out.append(row[valid].tolist())
        return out

    def summary(self) -> dict:
        tokens, forwards = self.tokens, self.forwards
        return {
            "tokens": tokens,
            "forwards": forwards,
            "tokens_per_forward": tokens / forwards if forwards else float("nan"),
            "seconds": self.seconds,
            "tokens_per_second": tokens / self.seconds if self.seconds > 0 else float("nan"),
        }


def generate_greedy(
    model: EvalModel,
    prompts: list[list[int]],
    setting: DecodingSetting,
    max_new_tokens: int,
    batch_size: int,
) -> Generation:
    """Greedy responses to `prompts`, decoded on `batch_size` slots of the rollout engine
    (continuous batching: a finished sequence's slot takes the next prompt). The responses come
    back as batches of `batch_size` rows in prompt order, each in its own layout
    (`RolloutBatch.row_slice`): what consumes them (teacher NLL, on-policy KL) forwards a batch
    at a time, and so holds at most `batch_size` rows, as the decoding did."""
    block = model.diffusion_cfg.block_size
    if max_new_tokens % block:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} is not a multiple of {model.name}'s block size "
            f"{block}: responses are decoded in whole blocks"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    rollout_cfg = setting.rollout_config(block, max_new_tokens)
    began = time.perf_counter()
    # greedy: the engine draws no seed from the generator; it is passed for the sampler fallback
    batch = generate_rollout(
        model.chunks,
        prompts,
        model.model_cfg,
        model.diffusion_cfg,
        rollout_cfg,
        max_new_tokens=max_new_tokens,
        slots=batch_size,
        generator=torch.Generator().manual_seed(0),
    )
    seconds = time.perf_counter() - began
    batches = [
        batch.row_slice(start, start + batch_size) for start in range(0, len(prompts), batch_size)
    ]
    return Generation(setting.name, batches, seconds)
