"""training/setup.py: the teacher's model config merged with explicit overrides, and a trained
student_init continued as it was trained (its mask row, block size and token shift)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_opdlm.checkpoint_layout import write_model_meta
from megatron_opdlm.config import DiffusionConfig
from megatron_opdlm.training import setup
from tests.tiny import tiny_config


def _teacher_meta(tmp_path, **fields):
    """A teacher checkpoint directory holding only its model description (enough for setup)."""
    model = dataclasses.replace(tiny_config().model, **fields)
    directory = tmp_path / "teacher"
    directory.mkdir()
    write_model_meta(directory, model, None)
    return directory, model


def test_run_time_overrides_are_merged_with_the_teacher(tmp_path):
    teacher, teacher_model = _teacher_meta(tmp_path, num_layers=3, eos_token_ids=[2])
    job = tiny_config(
        f"checkpoint.teacher={teacher}", "model.num_layers=3",  # agrees with the teacher
        "model.eos_token_ids=[2,5]", "model.max_position_embeddings=512",
    )  # fmt: skip
    setup.adopt_teacher_model_config(job)
    assert job.model.eos_token_ids == [2, 5] and job.model.max_position_embeddings == 512
    assert job.model.num_layers == 3 == teacher_model.num_layers


def test_an_unused_padded_row_as_mask_token_is_reachable(tmp_path):
    """vocab 100 padded to 104: rows 100..103 are unused (as Qwen3's padded rows are)."""
    teacher, teacher_model = _teacher_meta(tmp_path, vocab_size=100, vocab_pad_multiple=8)
    assert teacher_model.padded_vocab_size == 104
    job = tiny_config(f"checkpoint.teacher={teacher}", "model.mask_token_id=102",
                      "model.vocab_size=100")  # fmt: skip
    setup.adopt_teacher_model_config(job)
    assert job.model.mask_token_id == 102 and job.model.student_mask_token_id == 102
    assert job.model.padded_vocab_size == 104 and not job.model.adds_mask_row


def test_conflicting_overrides_are_refused(tmp_path):
    teacher, _ = _teacher_meta(tmp_path, num_layers=3)
    job = tiny_config(f"checkpoint.teacher={teacher}", "model.hidden_size=96")
    with pytest.raises(ValueError, match=r"model.hidden_size=96 \(the teacher has 64\)"):
        setup.adopt_teacher_model_config(job)
    # a mask row that would change the embedding's shape (120 + 1 row -> 128; 120 alone -> 120)
    job = tiny_config(f"checkpoint.teacher={teacher}", "model.mask_token_id=119")
    with pytest.raises(ValueError, match="--mask-token-id 119"):
        setup.adopt_teacher_model_config(job)


def test_mask_token_must_not_be_a_real_token(tmp_path):
    class Tokenizer:
        vocab_size = 101

    job = tiny_config("model.vocab_size=100", "model.mask_token_id=100")
    with pytest.raises(ValueError, match="model.mask_token_id=100 is a real token"):
        setup.check_mask_token(job, Tokenizer())


def _save_trained_student(directory, job, diffusion: DiffusionConfig, mask_value: float):
    """A "trained" student: random weights whose mask-token row is a recognisable constant."""
    from megatron_opdlm.checkpoint_layout import save_model_checkpoint
    from megatron_opdlm.models.builder import build_student

    torch.manual_seed(3)
    chunks = build_student(job)
    with torch.no_grad():
        weight = chunks[0].embedding.word_embeddings.weight  # [V, h]
        weight[job.model.student_mask_token_id] = mask_value
    save_model_checkpoint(chunks, directory, job.model, diffusion)


def test_student_init_keeps_its_trained_mask_row(single_process, tmp_path):
    from tests.unit.test_training_support import tiny_job

    job = tiny_job(tmp_path, "distill.mode=mdlm_sft", "diffusion.block_size=4")
    student_dir = tmp_path / "student"
    _save_trained_student(student_dir, job, DiffusionConfig(block_size=4), mask_value=0.25)
    job.checkpoint.student_init = str(student_dir)
    models = setup.build_models(job, resuming=False)
    module = models.student[0]
    while hasattr(module, "module"):
        module = module.module
    row = module.embedding.word_embeddings.weight[job.model.student_mask_token_id]  # [h]
    assert torch.equal(row, torch.full_like(row, 0.25))  # not reset to the mean embedding


def test_student_init_must_match_the_jobs_diffusion_settings(tmp_path):
    job = tiny_config()
    directory = tmp_path / "student"
    directory.mkdir()
    write_model_meta(directory, job.model, DiffusionConfig(block_size=8, token_shift=True))
    job = tiny_config(f"checkpoint.student_init={directory}", "diffusion.block_size=4")
    with pytest.raises(ValueError, match="trained with diffusion.block_size=8"):
        setup.check_job(job, world_size=1)  # what the trainer runs before building models
    job = tiny_config(f"checkpoint.student_init={directory}", "diffusion.block_size=8",
                      "diffusion.token_shift=true")  # fmt: skip
    setup.check_student_init(job)  # the same settings: accepted
    job.diffusion.token_shift = False
    with pytest.raises(ValueError, match="trained with diffusion.token_shift=True"):
        setup.check_student_init(job)
    other = tiny_config("model.num_layers=3")
    write_model_meta(directory, other.model, DiffusionConfig(block_size=8, token_shift=True))
    with pytest.raises(ValueError, match="model.num_layers 3 vs 2"):
        setup.check_student_init(job)
