"""The schedule passes: projecting only the logit rows changes nothing but the cost."""

from __future__ import annotations

import torch

from megatron_opdlm.models.builder import build_student, build_teacher
from megatron_opdlm.training import batches, steps
from megatron_opdlm.training.optimizer import wrap_ddp
from tests.unit.test_training_support import tiny_job


def _passes(job, teacher, student, micro):
    """(teacher targets, summed loss, student gradients) of one fused step."""
    for chunk in student:
        chunk.zero_grad_buffer()
    tokens = sum(m.num_loss_tokens for m in micro)
    made, original = [], steps.teacher_targets
    steps.teacher_targets = lambda *a, **k: made.append(original(*a, **k)) or made[-1]
    try:
        output = steps.run_step(student, teacher, micro, job, tokens, len(micro))
    finally:
        steps.teacher_targets = original
    grads = [p.main_grad.clone() for chunk in student for p in chunk.parameters()]
    return made, sum(m["loss"] for m in output.metrics), grads


def test_row_projection_equals_the_full_output_layer(single_process, tmp_path, monkeypatch):
    job = tiny_job(tmp_path, "distill.mode=offpolicy")
    torch.manual_seed(0)
    teacher, student = build_teacher(job), build_student(job)
    student[0].load_state_dict(teacher[0].state_dict())
    student = wrap_ddp(student, job)
    from megatron_opdlm.data.prompts import load_prompts

    data = load_prompts(job.data.train_prompts, vocab_size=120, eos_token_ids=[1],
                        max_prompt_length=32)  # fmt: skip
    rollout = batches.given_responses([data[i] for i in range(4)], job, 16, "cpu")
    x_t = batches.select_noisy_states(rollout, job, step=0, first_row=0)
    micro = batches.pack_rows(rollout, x_t, job, 0, 4)
    projected = _passes(job, teacher, student, micro)
    monkeypatch.setattr(steps, "_projection", lambda rows: {})
    full = _passes(job, teacher, student, micro)
    for got, want in zip(projected[0], full[0]):
        # The same matmul on fewer rows: equal up to fp32 rounding of the GEMM blocking.
        torch.testing.assert_close(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(projected[1], full[1], rtol=1e-5, atol=1e-6)
    for got, want in zip(projected[2], full[2]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert projected[1] > 0


def test_the_trainers_loss_contract_through_the_schedule_at_two_micro_batches_vs_one(
    single_process, tmp_path
):
    """Megatron's real schedule (calculate_per_token_loss set by wrap_ddp): 2 micro-batches of
    2 rows give the loss and gradients of 1 micro-batch of 4. A schedule that divided by the
    number of micro-batches would halve the 2-micro-batch gradients."""
    job = tiny_job(tmp_path, "distill.mode=offpolicy")
    torch.manual_seed(0)
    teacher, student = build_teacher(job), build_student(job)
    student[0].load_state_dict(teacher[0].state_dict())
    student = wrap_ddp(student, job)
    from megatron_opdlm.data.prompts import load_prompts

    data = load_prompts(job.data.train_prompts, vocab_size=120, eos_token_ids=[1],
                        max_prompt_length=32)  # fmt: skip
    rollout = batches.given_responses([data[i] for i in range(4)], job, 16, "cpu")
    x_t = batches.select_noisy_states(rollout, job, step=0, first_row=0)
    results = {}
    for micro_batch_size in (2, 4):
        job.train.micro_batch_size = micro_batch_size
        micro = batches.pack_rows(rollout, x_t, job, 0, 4)
        assert len(micro) == 4 // micro_batch_size
        results[micro_batch_size] = _passes(job, teacher, student, micro)
    two, one = results[2], results[4]
    # the same sums over other batch shapes: fp32 rounding of the GEMM blocking only
    torch.testing.assert_close(two[1], one[1], rtol=1e-5, atol=1e-6)
    for got, want in zip(two[2], one[2]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert max(float(g.abs().max()) for g in one[2]) > 1e-4  # the gradients are not all zero
