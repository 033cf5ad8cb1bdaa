"""Teacher / student semantics on a tiny model, one process (fp32, local spec)."""

from __future__ import annotations

import torch

from megatron_opdlm.models import masks
from megatron_opdlm.models.builder import build_student, build_teacher, copy_weights
from tests.tiny import tiny_config


def _student_logits(student, tokens, prompt_length, block_size):
    b, length = tokens.shape
    valid = torch.ones(b, length, dtype=torch.bool)
    mask = masks.block_causal_mask(length, prompt_length, block_size, valid)
    positions = torch.arange(length).expand(b, -1)
    with torch.no_grad():
        return student[0](tokens, positions, mask)  # [b, s, v]


def test_block_causal_semantics(single_process):
    config = tiny_config()
    student = build_student(config)
    block, prompt_length = 4, 4
    tokens = torch.randint(2, 120, (2, 16))
    base = _student_logits(student, tokens, prompt_length, block)
    # change a token in response block 1 (columns 8-11): blocks <= 0 (columns < 8) unchanged
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 7) % 118 + 2
    after = _student_logits(student, changed, prompt_length, block)
    assert torch.equal(after[:, :8], base[:, :8])
    # every position of block 1 sees the change (bidirectional inside the block)
    assert ((after[:, 8:12] - base[:, 8:12]).abs().amax(dim=-1) > 1e-6).all()


def test_block_one_with_shift_equals_teacher_exactly(single_process):
    config = tiny_config("diffusion.block_size=1", "rollout.steps_per_block=1")
    teacher, student = build_teacher(config), build_student(config)
    copy_weights(teacher, student)
    tokens = torch.randint(2, 120, (2, 12))
    positions = torch.arange(12).expand(2, -1)
    with torch.no_grad():
        teacher_logits = teacher[0](tokens, positions, None)  # built-in causal mask
    student_logits = _student_logits(student, tokens, prompt_length=5, block_size=1)
    assert torch.equal(teacher_logits, student_logits)
    # and the packed row's shifted x_t logits are the teacher's next-token logits
    p, r = 5, 7
    x_t = torch.full((2, r), config.model.student_mask_token_id)
    row = torch.cat([tokens, x_t], dim=1)
    mask, row_positions = masks.packed_row_mask(p, r, 1, torch.ones(2, p + 2 * r, dtype=torch.bool))
    with torch.no_grad():
        packed_logits = student[0](row, row_positions, mask)
    columns = masks.xt_logit_columns(p, r, 1, token_shift=True)
    # not bitwise: the packed row reduces attention over more (masked-out) columns
    torch.testing.assert_close(
        packed_logits[:, columns], teacher_logits[:, p - 1 : p + r - 1], rtol=0, atol=1e-5
    )


def test_packed_row_equals_per_block_rollout_views(single_process):
    config = tiny_config()
    student = build_student(config)
    block, p, r, b = 4, 5, 12, 2
    mask_id = config.model.student_mask_token_id
    prompt = torch.randint(2, 120, (b, p))
    x0 = torch.randint(2, 120, (b, r))
    x_t = x0.clone()
    x_t[torch.rand(b, r) < 0.5] = mask_id
    row = torch.cat([prompt, x0, x_t], dim=1)
    valid = torch.ones(b, p + 2 * r, dtype=torch.bool)
    mask, positions = masks.packed_row_mask(p, r, block, valid)
    with torch.no_grad():
        packed = student[0](row, positions, mask)[:, p + r :]  # [b, R, v]
    for blk in range(r // block):
        start, end = blk * block, (blk + 1) * block
        view = torch.cat([prompt, x0[:, :start], x_t[:, start:end]], dim=1)
        view_length = view.shape[1]
        noisy = torch.zeros(b, view_length, dtype=torch.bool)
        noisy[:, -block:] = True
        block_ids = masks.aligned_block_ids(torch.arange(view_length), p, block).expand(b, -1)
        view_mask = masks.block_diffusion_mask(block_ids, noisy, block_ids, noisy)
        view_positions = torch.arange(view_length).expand(b, -1)
        with torch.no_grad():
            logits = student[0](view, view_positions, view_mask)[:, -block:]
        # fp32 tolerance: the packed row sums attention over more (masked) columns, which changes
        # the reduction order of the softmax and matmuls, not the math.
        torch.testing.assert_close(packed[:, start:end], logits, rtol=0, atol=1e-5)


def test_teacher_frozen_and_mask_row_is_mean_embedding(single_process):
    config = tiny_config()
    teacher, student = build_teacher(config), build_student(config)
    assert not any(p.requires_grad for p in teacher[0].parameters())
    assert not teacher[0].training
    weight = student[0].embedding.word_embeddings.weight
    vocab = config.model.vocab_size
    torch.testing.assert_close(
        weight[config.model.student_mask_token_id], weight[:vocab].double().mean(0).float()
    )
    assert config.model.student_mask_token_id == vocab
