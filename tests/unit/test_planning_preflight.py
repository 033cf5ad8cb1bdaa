"""Preflight of tools/train.py: skipped on a CPU unless a GPU is named, passes a fitting layout,
stops a layout predicted not to fit before any model is built (exit 2), and can be overridden."""

from __future__ import annotations

import logging

from megatron_opdlm.planning.preflight import preflight
from tests.tiny import tiny_config

# a Llama-3-8B-sized architecture: its teacher + student model states alone exceed an L40S
BIG = ["model.num_layers=32", "model.hidden_size=4096", "model.ffn_hidden_size=14336",
       "model.num_attention_heads=32", "model.num_query_groups=8", "model.vocab_size=128256",
       "model.vocab_pad_multiple=128", "precision.dtype=bf16"]  # fmt: skip


def test_skipped_on_cpu_without_a_named_gpu(caplog):
    caplog.set_level(logging.INFO)
    assert preflight(tiny_config(*BIG))  # would not fit, but there is no GPU to plan for
    assert "skipped on a CPU" in caplog.text


def test_tiny_job_fits_a_named_gpu(single_process, caplog):
    caplog.set_level(logging.INFO)
    assert preflight(tiny_config("train.preflight_gpu=h100-80g"))
    assert "needs" in caplog.text


def test_layout_that_does_not_fit_stops_with_the_table(single_process, caplog):
    job = tiny_config(*BIG, "train.preflight_gpu=l40s-48g")
    assert not preflight(job)
    assert "predicted NOT to fit" in caplog.text and "teacher_weights" in caplog.text
    assert "--skip-preflight" in caplog.text
    job.train.preflight = False
    assert preflight(job)


def test_train_cli_exits_2_before_building_models(monkeypatch, caplog, tmp_path):
    from megatron_opdlm.training import cli, setup

    def never(*args, **kwargs):
        raise AssertionError("models were built although the preflight failed")

    monkeypatch.setattr(setup, "build_models", never)
    prompts = tmp_path / "prompts.jsonl"  # the input checks before the planner need a data file
    prompts.write_text('{"prompt": "1 + 1 ="}\n')
    overrides = [*BIG, "precision.transformer_impl=local", "train.preflight_gpu=l40s-48g",
                 "model.eos_token_ids=[1]", "model.pad_token_id=0",
                 f"data.train_prompts={prompts}"]  # fmt: skip
    assert cli.main(overrides) == 2
    assert "predicted NOT to fit" in caplog.text


def test_plans_the_teacher_checkpoints_architecture(single_process, tmp_path, caplog):
    """The trainer takes the model section from checkpoint.teacher; the preflight must too."""
    from megatron_opdlm.checkpoint_layout import write_model_meta
    from megatron_opdlm.config import ModelConfig

    write_model_meta(tmp_path, tiny_config(*BIG).model, None)
    job = tiny_config(f"checkpoint.teacher={tmp_path}", "train.preflight_gpu=l40s-48g")
    # no model.* set by the job: the teacher's architecture is taken whole (explicit
    # architecture fields that contradict the teacher are refused by the trainer's merge)
    job.model = ModelConfig()
    assert not preflight(job)  # the default model section alone would fit easily
    assert job.model == ModelConfig()  # the job itself is left to the trainer
