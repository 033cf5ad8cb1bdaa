"""Vocabulary handling shared by teacher and student.

Teacher and student use the same padded vocabulary (ModelConfig.padded_vocab_size) so their
vocab-parallel shards line up. Rows that are not real tokens (padding) and the student's mask token
can never be predicted: their logits are set to -inf before any softmax (sampler and losses alike).
"""

from __future__ import annotations

import torch

from megatron_opdlm.config import ModelConfig


def invalid_vocab_mask(
    model: ModelConfig, vocab_start: int, vocab_end: int, device=None
) -> torch.Tensor:
    """[vocab_end - vocab_start] bool, True for ids that must never be predicted."""
    ids = torch.arange(vocab_start, vocab_end, device=device)
    return (ids >= model.vocab_size) | (ids == model.student_mask_token_id)


def mask_invalid_logits(
    logits: torch.Tensor, model: ModelConfig, vocab_start: int = 0
) -> torch.Tensor:
    """logits [..., v_local] -> same with -inf at ids that are not predictable tokens."""
    invalid = invalid_vocab_mask(model, vocab_start, vocab_start + logits.shape[-1], logits.device)
    return logits.masked_fill(invalid, float("-inf"))


def local_vocab_range(model: ModelConfig) -> tuple[int, int]:
    """[start, end) of the padded vocabulary held by this tensor-parallel rank."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    per_rank = model.padded_vocab_size // tp
    return rank * per_rank, (rank + 1) * per_rank


@torch.no_grad()
def init_mask_token_row(model_chunks, model: ModelConfig) -> None:
    """Set the student's added mask-token embedding row to the mean real-token embedding.

    Only when the config adds the row (mask_token_id None); a named unused row (Qwen3) keeps its
    trained value. Works on a vocab-parallel embedding: the mean is all-reduced over TP ranks.
    """
    if not model.adds_mask_row:
        return
    from megatron.core import parallel_state

    start, end = local_vocab_range(model)
    mask_id = model.student_mask_token_id
    for chunk in model_chunks:
        embedding = getattr(_unwrap(chunk), "embedding", None)
        if embedding is None:
            continue
        weight = embedding.word_embeddings.weight  # [V/tp, h]
        real_rows = max(0, min(end, model.vocab_size) - start)
        row_sum = weight[:real_rows].double().sum(0)  # [h]
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(
                row_sum, group=parallel_state.get_tensor_model_parallel_group()
            )
        if start <= mask_id < end:
            weight[mask_id - start] = (row_sum / model.vocab_size).to(weight.dtype)


def _unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module
