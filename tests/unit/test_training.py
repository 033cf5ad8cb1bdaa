"""The trainer in one process: every mode learns, NaN guards, bad input, exact resume.

Tiny models (2 layers, width 64, vocab 120), fp32 on the CPU; each run is a few seconds.
"""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from megatron_opdlm.training import steps as steps_module
from megatron_opdlm.training.resilience import NonFiniteError
from megatron_opdlm.training.trainer import Trainer
from tests.unit.test_training_support import assert_checkpoints_equal, tiny_job


def _losses(result):
    return [r["loss"] for r in result.history if not r["skipped"]]


@pytest.mark.parametrize("mode", ["opdlm", "opdlm_off", "offpolicy", "mdlm_sft"])
def test_each_mode_trains_and_its_loss_goes_down(single_process, tmp_path, mode):
    job = tiny_job(tmp_path, f"distill.mode={mode}", "train.rollout_steps=8")
    result = Trainer(job).train()
    losses = _losses(result)
    assert len(losses) == 16 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    # Noisy (fresh rollouts or masks every step) but a clear fall: measured 20-60 % lower.
    assert last < 0.9 * first, (mode, losses)


def _inject_nan_at(monkeypatch, call_index: int):
    """Make the teacher's log-probs NaN on the `call_index`-th teacher_targets call."""
    calls = {"n": 0}
    original = steps_module.teacher_targets

    def poisoned(*args, **kwargs):
        targets = original(*args, **kwargs)
        if calls["n"] == call_index:
            targets.logprobs[0, 0, 0] = float("nan")
        calls["n"] += 1
        return targets

    monkeypatch.setattr(steps_module, "teacher_targets", poisoned)


def test_nan_teacher_logprobs_stop_and_leave_the_last_checkpoint(single_process, tmp_path,
                                                                 monkeypatch):  # fmt: skip
    save_dir = tmp_path / "ckpt"
    job = tiny_job(tmp_path, "train.global_batch_size=8", "train.micro_batch_size=8",
                   f"checkpoint.save_dir={save_dir}", "checkpoint.save_interval=1")  # fmt: skip
    _inject_nan_at(monkeypatch, call_index=2)  # one micro-batch per step: the 3rd step
    trainer = Trainer(job)
    with pytest.raises(NonFiniteError) as info:
        trainer.train()
    assert "non-finite teacher log-probs at optimizer step 3 on rank(s) [0]" in str(info.value)
    assert (save_dir / "latest").read_text().strip() == "iter_0000002"
    before = {p: p.stat().st_mtime_ns for p in (save_dir / "iter_0000002").rglob("*")}
    assert sorted(p.name for p in save_dir.iterdir()) == ["iter_0000001", "iter_0000002", "latest"]
    assert {p: p.stat().st_mtime_ns for p in (save_dir / "iter_0000002").rglob("*")} == before


def test_nan_teacher_logprobs_skip_policy_and_retention(single_process, tmp_path, monkeypatch):
    save_dir = tmp_path / "ckpt"
    job = tiny_job(tmp_path, "train.nan_policy=skip", f"checkpoint.save_dir={save_dir}",
                   "checkpoint.save_interval=1", "checkpoint.keep_last=2")  # fmt: skip
    _inject_nan_at(monkeypatch, call_index=6)  # two micro-batches per step: the 4th step
    result = Trainer(job).train()
    skipped = [r["step"] for r in result.history if r["skipped"]]
    assert skipped == [4]
    assert result.optimizer_step == 8
    assert all(math.isfinite(x) for x in _losses(result))
    # keep_last=2: of the four saves only the last two remain, `latest` names the newest
    assert sorted(p.name for p in save_dir.iterdir()) == ["iter_0000003", "iter_0000004", "latest"]
    assert (save_dir / "latest").read_text().strip() == "iter_0000004"


def test_deadline_saves_and_stops(single_process, tmp_path):
    save_dir = tmp_path / "ckpt"
    # 0.001 min: the time left is shorter than the 30 s margin before the first rollout block,
    # so the first rollout is dropped and the initial state saved (resumable, exit code 3).
    job = tiny_job(tmp_path, "train.deadline_minutes=0.001", f"checkpoint.save_dir={save_dir}")
    result = Trainer(job).train()
    assert result.stopped_early.startswith("deadline") and result.resumable
    assert result.rollout_step == 0 and result.optimizer_step == 0
    assert (save_dir / "latest").read_text().strip() == "iter_0000000"


def test_bf16_recompute_distributed_optimizer_runs(single_process, tmp_path):
    job = tiny_job(tmp_path, "precision.dtype=bf16", "precision.recompute=full",
                   "parallel.use_distributed_optimizer=true", "train.rollout_steps=2")  # fmt: skip
    result = Trainer(job).train()
    assert result.optimizer_step == 4
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in result.history)


def test_bad_input_is_refused_before_any_model_is_built(single_process, tmp_path, monkeypatch):
    from megatron_opdlm.training import setup

    def no_models(*args, **kwargs):
        raise AssertionError("models were built")

    monkeypatch.setattr(setup, "build_models", no_models)
    not_ckpt = tmp_path / "empty"
    not_ckpt.mkdir()
    with pytest.raises(ValueError, match="is not a training checkpoint"):
        Trainer(tiny_job(tmp_path, f"checkpoint.load={not_ckpt}"))
    with pytest.raises(ValueError, match="checkpoint.load=.* does not exist"):
        Trainer(tiny_job(tmp_path, f"checkpoint.load={tmp_path / 'missing'}"))
    with pytest.raises(ValueError, match="not a multiple of train.global_batch_size=3"):
        Trainer(tiny_job(tmp_path, "train.global_batch_size=3", "train.micro_batch_size=1"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_ids": [3, 4]}\n{"prompt_ids": [3, 4]\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        Trainer(tiny_job(tmp_path, f"data.train_prompts={bad}"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no records"):
        Trainer(tiny_job(tmp_path, f"data.train_prompts={tmp_path / 'empty.jsonl'}"))
    with pytest.raises(ValueError, match="mdlm_sft.*response|given responses"):
        no_responses = tmp_path / "prompts_only.jsonl"
        no_responses.write_text('{"prompt_ids": [3, 4]}\n' * 8)
        Trainer(tiny_job(tmp_path, "distill.mode=mdlm_sft", f"data.train_prompts={no_responses}"))


def test_distributed_optimizer_resume_is_bit_exact(single_process, tmp_path, monkeypatch):
    """4 rollout steps straight == 2 steps, SIGUSR1, resume for 2 (DistributedOptimizer)."""
    common = ["parallel.use_distributed_optimizer=true", "optim.weight_decay=0.1",
              "distill.mode=opdlm"]  # fmt: skip
    straight_dir, split_dir = tmp_path / "straight", tmp_path / "split"
    straight = Trainer(tiny_job(tmp_path, *common, f"checkpoint.save_dir={straight_dir}"))
    want = straight.train()

    first = Trainer(tiny_job(tmp_path, *common, f"checkpoint.save_dir={split_dir}"))
    original = first._rollout_step

    def step_then_signal():
        history = original()
        if first.rollout_step == 1:  # the step in flight finishes, then the trainer saves
            os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's warning signal
        return history

    monkeypatch.setattr(first, "_rollout_step", step_then_signal)
    stopped = first.train()
    assert stopped.stopped_early == "signal SIGUSR1" and stopped.rollout_step == 2
    assert (split_dir / "latest").read_text().strip() == "iter_0000002"
    resumed = Trainer(tiny_job(tmp_path, *common, f"checkpoint.save_dir={split_dir}"))
    assert resumed.rollout_step == 2 and resumed.optimizer_step == 4
    rest = resumed.train()
    assert rest.stopped_early is None and rest.optimizer_step == 8
    got = stopped.history + rest.history
    assert [r["loss"] for r in got] == [r["loss"] for r in want.history]
    assert_checkpoints_equal(straight_dir / "iter_0000004", split_dir / "iter_0000004")
    params = [p for chunk in resumed.models.student for p in chunk.parameters()]
    assert all(torch.isfinite(p).all() for p in params)
