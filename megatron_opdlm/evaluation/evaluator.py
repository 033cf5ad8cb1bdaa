"""Evaluate one model against the teacher: QA accuracy, teacher NLL, on-policy KL, decoding speed.

For a model M (the teacher itself, the student before OPDLM, a trained student):
(a) QA exact match: greedy answers to the QA set under M's quality setting (AR decoding, or
    static 1 token per round), scored by `evaluation.scoring`.
(b) teacher NLL: the teacher's mean per-token NLL of M's greedy answers to the held-out prompts,
    under every decoding setting (lower = closer to what the teacher would say).
(c) on-policy KL: mean forward KL(p_T || p_S) over one state per block of M's own quality-setting
    rollouts on the held-out prompts (0 for the teacher scoring itself as an AR model).
(d) decoding cost under every setting: tokens per forward and wall-clock tokens per second.

Every number is a ratio of sums over the whole evaluation (tokens weigh equally, not sequences).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_opdlm.evaluation import decoding, metrics
from megatron_opdlm.evaluation.inputs import EvalItem
from megatron_opdlm.evaluation.models import EvalModel, check_compatible
from megatron_opdlm.evaluation.scoring import score_answers
from megatron_opdlm.runtime.logging import get_logger

log = get_logger(__name__)


@dataclass
class EvalSettings:
    max_new_tokens: int = 48  # held-out responses
    qa_max_new_tokens: int = 24  # QA answers (the scoring reads the first sentence only)
    batch_size: int = 8
    thresholds: tuple[float, ...] = decoding.DEFAULT_THRESHOLDS
    seed: int = 1234  # state selection of the KL
    num_examples: int = 6  # QA answers kept in the report per model

    def validate(self) -> None:
        for name in ("max_new_tokens", "qa_max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def _decode_text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def _warm_up(model: EvalModel, prompt: list[int]) -> None:
    """One tiny generation so the timed runs do not pay first-call allocation costs."""
    block = model.diffusion_cfg.block_size
    decoding.generate_greedy(model, [prompt], decoding.quality_setting(model), block, 1)


def evaluate_qa(model: EvalModel, qa: list[EvalItem], tokenizer, settings: EvalSettings) -> dict:
    """(a): accuracy overall and per category, with a few example answers."""
    block = model.diffusion_cfg.block_size
    cap = -(-settings.qa_max_new_tokens // block) * block
    generation = decoding.generate_greedy(
        model, [q.prompt_ids for q in qa], decoding.quality_setting(model), cap, settings.batch_size
    )
    answers = [_decode_text(tokenizer, ids) for ids in generation.responses()]
    score, verdicts = score_answers([q.item for q in qa], answers)
    examples = [
        {"prompt": q.item["prompt"], "reference": q.item["answer"], "answer": a, "correct": ok}
        for q, a, ok in zip(qa[: settings.num_examples], answers, verdicts, strict=False)
    ]
    return {
        "accuracy": score.accuracy,
        "correct": score.correct,
        "total": score.total,
        "by_category": {k: list(v) for k, v in sorted(score.by_category.items())},
        "examples": examples,
    }


def evaluate_heldout(
    model: EvalModel, teacher: EvalModel, prompts: list[EvalItem], settings: EvalSettings
) -> dict:
    """(b), (c), (d) on the held-out prompts."""
    out: dict = {"decoding": {}}
    ids = [p.prompt_ids for p in prompts]
    for index, setting in enumerate(decoding.decoding_settings(model, settings.thresholds)):
        generation = decoding.generate_greedy(
            model, ids, setting, settings.max_new_tokens, settings.batch_size
        )
        nll_sum, nll_count = 0.0, 0
        for batch in generation.batches:
            s, n = metrics.teacher_nll(teacher, batch)
            nll_sum, nll_count = nll_sum + s, nll_count + n
        row = generation.summary()
        row["teacher_nll"] = nll_sum / nll_count if nll_count else float("nan")
        row["mean_length"] = row["tokens"] / max(1, len(ids))
        out["decoding"][setting.name] = row
        log.info(
            "%s %s: %d tokens, %.2f tokens/forward, %.1f tokens/s, teacher NLL %.3f",
            model.name,
            setting.name,
            row["tokens"],
            row["tokens_per_forward"],
            row["tokens_per_second"],
            row["teacher_nll"],
        )
        if index == 0:  # the quality setting: its rollouts are the on-policy states of the KL
            out["teacher_nll"] = row["teacher_nll"]
            generator = torch.Generator().manual_seed(settings.seed)
            kl_sum, kl_count = 0.0, 0
            for batch in generation.batches:
                s, n = metrics.onpolicy_kl(teacher, model, batch, generator)
                kl_sum, kl_count = kl_sum + s, kl_count + n
            out["kl"] = kl_sum / kl_count if kl_count else float("nan")
            out["kl_tokens"] = kl_count
    return out


def evaluate_model(
    model: EvalModel,
    teacher: EvalModel,
    qa: list[EvalItem],
    heldout: list[EvalItem],
    tokenizer,
    settings: EvalSettings,
) -> dict:
    """The full record of one model (see the module docstring)."""
    settings.validate()
    check_compatible(teacher, model)
    if heldout:
        _warm_up(model, heldout[0].prompt_ids)
    record = {
        "name": model.name,
        "checkpoint": model.checkpoint,
        "kind": model.kind,
        "block_size": model.diffusion_cfg.block_size,
        "token_shift": model.diffusion_cfg.token_shift,
        "training_tokens": model.training_tokens,
    }
    if qa:
        record["qa"] = evaluate_qa(model, qa, tokenizer, settings)
        log.info(
            "%s QA accuracy %.3f (%d/%d)",
            model.name,
            record["qa"]["accuracy"],
            record["qa"]["correct"],
            record["qa"]["total"],
        )
    if heldout:
        record.update(evaluate_heldout(model, teacher, heldout, settings))
    return record
