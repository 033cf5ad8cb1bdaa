"""The fused teacher + student schedule (`training.steps.run_step`) against the two-pass step it
replaced (`tests/two_pass_reference.py`): the same losses, gradient norms, evaluations and
updated weights bit for bit (the same operations on the same values, only scheduled
differently), and teacher targets held per micro-batch instead of per step.

PP=2, PP=2 x VPP=2 and TP=2 + SP on gloo: tests/distributed/test_fused_step.py.
"""

from __future__ import annotations

import pytest
import torch

from megatron_opdlm.models.builder import build_student, build_teacher, copy_weights
from megatron_opdlm.training import batches, steps
from megatron_opdlm.training import evaluate as evaluate_module
from megatron_opdlm.training import trainer as trainer_module
from megatron_opdlm.training.optimizer import wrap_ddp
from tests import two_pass_reference as reference
from tests.unit.test_training_support import assert_checkpoints_equal, tiny_job

STEP_FUNCTIONS = {"fused": steps.run_step, "two_pass": reference.run_step}


def _train(tmp_path, monkeypatch, name, *overrides):
    monkeypatch.setattr(trainer_module, "run_step", STEP_FUNCTIONS[name])
    monkeypatch.setattr(evaluate_module, "run_step", STEP_FUNCTIONS[name])
    job = tiny_job(tmp_path, "train.rollout_steps=2", f"train.run_dir={tmp_path / name}",
                   f"checkpoint.save_dir={tmp_path / f'ckpt_{name}'}", *overrides)  # fmt: skip
    return trainer_module.Trainer(job).train()


@pytest.mark.parametrize(
    "overrides",
    [
        ("distill.mode=offpolicy", "distill.divergence=forward_kl"),
        # the student's own rollouts, sparse targets, and the held-out evaluation (forward only)
        ("distill.mode=opdlm", "distill.divergence=topk_forward_kl", "data.eval_prompts=EVAL"),
    ],
)
def test_fused_step_equals_the_two_pass_step_bitwise(single_process, tmp_path, monkeypatch,
                                                     overrides):  # fmt: skip
    overrides = [o.replace("EVAL", str(tmp_path / "eval.jsonl")) for o in overrides]
    tiny_job(tmp_path)  # writes the prompt files
    fused = _train(tmp_path, monkeypatch, "fused", *overrides)
    two_pass = _train(tmp_path, monkeypatch, "two_pass", *overrides)
    assert len(fused.history) == 4 and not any(r["skipped"] for r in fused.history)
    for key in ("loss", "divergence", "grad_norm", "loss_tokens"):
        assert [r[key] for r in fused.history] == [r[key] for r in two_pass.history], key
    assert fused.evals == two_pass.evals
    if "data.eval_prompts" in " ".join(overrides):
        assert len(fused.evals) == 2 and fused.evals[0]["kl"] > 0
    # model and optimizer state after 4 optimizer steps
    name = "iter_0000002"
    assert_checkpoints_equal(tmp_path / "ckpt_fused" / name, tmp_path / "ckpt_two_pass" / name)


def _models_and_rows(tmp_path, rows: int):
    job = tiny_job(tmp_path, "distill.mode=offpolicy", "train.micro_batch_size=1",
                   f"train.global_batch_size={rows}")  # fmt: skip
    torch.manual_seed(0)
    teacher, student = build_teacher(job), build_student(job)
    copy_weights(teacher, student)
    student = wrap_ddp(student, job)
    from megatron_opdlm.data.prompts import load_prompts

    data = load_prompts(job.data.train_prompts, vocab_size=120, eos_token_ids=[1],
                        max_prompt_length=32)  # fmt: skip
    rollout = batches.given_responses([data[i] for i in range(rows)], job, 16, "cpu")
    x_t = batches.select_noisy_states(rollout, job, step=0, first_row=0)
    return job, teacher, student, batches.pack_rows(rollout, x_t, job, 0, rows)


def test_teacher_targets_are_held_per_micro_batch_not_per_step(single_process, tmp_path):
    """1 vs 4 micro-batches of one row: the fused step never holds more than one micro-batch's
    targets; the two-pass step holds all of the step's (the count can see the old behaviour)."""
    seen = {}
    for rows in (1, 4):
        job, teacher, student, micro = _models_and_rows(tmp_path, rows)
        assert len(micro) == rows
        tokens = sum(m.num_loss_tokens for m in micro)
        for name, run in STEP_FUNCTIONS.items():
            for chunk in student:
                chunk.zero_grad_buffer()
            with reference.LiveTargets() as live:
                output = run(student, teacher, micro, job, tokens, rows)
            assert len(live.sizes) == rows and len(output.metrics) == rows
            assert output.teacher_finite
            seen[name, rows] = live
    for rows in (1, 4):
        fused = seen["fused", rows]
        assert fused.max_alive == 1 and fused.max_bytes == max(fused.sizes)
    two_pass = seen["two_pass", 4]
    assert two_pass.max_alive == 4 and two_pass.max_bytes == sum(two_pass.sizes)
    assert seen["two_pass", 4].sizes == seen["fused", 4].sizes  # the same targets were made
