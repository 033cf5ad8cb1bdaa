"""Stops inside a rollout step (training/preemption.py), in one process with real signals.

A SIGTERM sent at a chosen point (before a rollout block, after an optimizer step, at the last
optimizer step of a rollout step), then a resumed run to the end: final checkpoint (model and
optimizer) bit-identical to an uninterrupted run's, the same per-step metrics, and the same
evaluations (the one a stop skipped is run by the resumed run). One process, one thread: the
runs are bit-reproducible.
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.unit.test_training_support import assert_checkpoints_equal, tiny_job

pytestmark = pytest.mark.slow

STEPS = 4  # rollout steps, 2 optimizer steps each; evaluation every 2 rollout steps


def _job(tmp_path, name: str, *overrides: str):
    run = tmp_path / name
    return tiny_job(tmp_path, f"train.rollout_steps={STEPS}", "train.eval_interval=2",
                    f"data.eval_prompts={tmp_path / 'eval.jsonl'}", f"train.run_dir={run}",
                    f"checkpoint.save_dir={run / 'ckpt'}", *overrides)  # fmt: skip


def _kls(evals) -> list[tuple[int, float]]:
    return [(e["rollout_step"], e["kl"]) for e in evals]


def _signal_before_block(trainer, rollout_step: int, block: int, sent: list) -> None:
    original = trainer.stop_points.rollout_abort_check

    def check_factory(save_seconds, group):
        check = original(save_seconds, group)

        def should_abort(block_index):
            if trainer.rollout_step == rollout_step and block_index == block and not sent:
                sent.append(block_index)
                os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the rollout
            return check(block_index)

        return should_abort

    trainer.stop_points.rollout_abort_check = check_factory


def _signal_after_optimizer_step(trainer, optimizer_step: int, sent: list) -> None:
    original = trainer._optimizer_step

    def step(*args, **kwargs):
        record = original(*args, **kwargs)
        if trainer.optimizer_step + 1 == optimizer_step and not sent:
            sent.append(optimizer_step)
            os.kill(os.getpid(), signal.SIGTERM)
        return record

    trainer._optimizer_step = step


def test_stops_inside_a_rollout_step_resume_exactly(single_process, tmp_path):
    from megatron_opdlm.training.trainer import Trainer

    straight = Trainer(_job(tmp_path, "straight")).train()
    assert straight.stopped_early is None and straight.optimizer_step == 2 * STEPS
    want_losses = [r["loss"] for r in straight.history]
    final = f"iter_{STEPS:07d}"
    cases = {
        # name: (how the signal is sent, rollout step / optimizer step saved, checkpoint name)
        "rollout_block": (lambda t, s: _signal_before_block(t, 1, 1, s), (1, 2), "iter_0000001"),
        "between_steps": (lambda t, s: _signal_after_optimizer_step(t, 5, s), (2, 5),
                          "iter_0000002_001"),
        "end_of_step": (lambda t, s: _signal_after_optimizer_step(t, 4, s), (2, 4),
                        "iter_0000002"),
    }  # fmt: skip
    for name, (arm, (rollout_step, optimizer_step), saved) in cases.items():
        first, sent = Trainer(_job(tmp_path, name)), []
        arm(first, sent)
        stopped = first.train()
        assert sent, f"{name}: the signal was never sent"
        assert stopped.stopped_early == "signal SIGTERM" and stopped.resumable, name
        assert (stopped.rollout_step, stopped.optimizer_step) == (rollout_step, optimizer_step)
        assert stopped.checkpoint.endswith(saved), (name, stopped.checkpoint)
        resumed = Trainer(_job(tmp_path, name)).train()
        assert resumed.stopped_early is None and resumed.optimizer_step == 2 * STEPS, name
        losses = [r["loss"] for r in stopped.history + resumed.history]
        assert losses == want_losses, name  # bit-identical, not approximately
        # Evaluations: rollout steps 0, 2, 4 in both; end_of_step skipped the one of step 2
        # and the resumed run ran it first.
        assert _kls(stopped.evals + resumed.evals) == _kls(straight.evals), name
        run = tmp_path / name / "ckpt"
        assert_checkpoints_equal(tmp_path / "straight" / "ckpt" / final, run / final)


def test_a_stop_file_ends_the_run_as_finished(single_process, tmp_path):
    from megatron_opdlm.training.trainer import Trainer

    job = _job(tmp_path, "stopped")
    trainer = Trainer(job)
    (tmp_path / "stopped" / "STOP").write_text("")
    result = trainer.train()
    assert result.stopped_early.startswith("STOP file") and not result.resumable
    assert (tmp_path / "stopped" / "ckpt" / "latest").read_text().strip() == "iter_0000000"


def test_a_stop_before_the_first_optimizer_step_resumes_exactly(single_process, tmp_path):
    """The distributed optimizer has no state to save yet (megatron's state_dict asserts on it):
    the checkpoint stores none and the resumed run starts the optimizer fresh, as it was."""
    from megatron_opdlm.training.trainer import Trainer

    dist_opt = ("parallel.use_distributed_optimizer=true", "train.rollout_steps=2")
    straight = Trainer(_job(tmp_path, "straight", *dist_opt)).train()
    first, sent = Trainer(_job(tmp_path, "early", *dist_opt)), []
    _signal_before_block(first, 0, 0, sent)
    stopped = first.train()
    assert sent and stopped.optimizer_step == 0 and stopped.checkpoint.endswith("iter_0000000")
    resumed = Trainer(_job(tmp_path, "early", *dist_opt)).train()
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    final = "iter_0000002"
    assert_checkpoints_equal(tmp_path / "straight" / "ckpt" / final,
                             tmp_path / "early" / "ckpt" / final)  # fmt: skip
