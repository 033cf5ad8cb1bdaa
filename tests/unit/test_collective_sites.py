"""No host-value collective outside runtime.collectives (what breaks under NCCL, invisible on gloo).

Both checks of tests/collective_guard.py: the static one over the package's source, and the
run-time one around a real one-process trainer run (rollout, teacher, student, finite checks,
metrics, stop agreement, evaluation, checkpoint) on gloo.
"""

from __future__ import annotations

import pytest

from tests.collective_guard import (
    ALLOWED,
    PACKAGE,
    direct_collective_calls,
    guarded_collectives,
    violations,
)
from tests.unit.test_training_support import tiny_job


def test_the_scanner_finds_every_spelling_of_a_collective():
    source = (
        "import torch\nimport torch.distributed as dist\nimport torch.distributed as td\n"
        "from torch import distributed\nfrom torch.distributed import all_gather_object\n"
        "dist.all_reduce(x)\ntorch.distributed.barrier()\ntd.broadcast(x, 0)\n"
        "distributed.all_gather(a, b)\ndist.get_rank()\ndist.is_initialized()\n"
    )
    assert direct_collective_calls(source) == [
        (5, "all_gather_object"), (6, "all_reduce"), (7, "barrier"), (8, "broadcast"),
        (9, "all_gather"),
    ]  # fmt: skip


def test_no_module_outside_runtime_calls_a_collective_directly():
    # Fails on f91ed8a: resilience, trainer, evaluate, metrics, checkpointing, setup, sampler,
    # model_runner and distill/loss all called torch.distributed themselves.
    assert violations() == {}


def test_the_allow_list_names_modules_that_exist_and_still_need_it():
    for relative, reason in ALLOWED.items():
        path = PACKAGE / relative
        assert path.is_file(), relative
        assert direct_collective_calls(path.read_text()), f"{relative} no longer needs: {reason}"


def test_a_training_run_issues_collectives_only_through_the_runtime(single_process, tmp_path):
    from megatron_opdlm.training.trainer import Trainer

    held_out = tmp_path / "eval.jsonl"
    job = tiny_job(tmp_path, "train.rollout_steps=1", f"data.eval_prompts={held_out}",
                   f"checkpoint.save_dir={tmp_path / 'ckpt'}")  # fmt: skip
    with guarded_collectives() as seen:
        result = Trainer(job).train()
    assert result.optimizer_step == 2
    ours = {module for module, _ in seen if module is not None}
    # the host-value collectives of the step did run, through the helper
    assert "runtime/collectives.py" in ours, seen


def test_the_run_time_guard_rejects_a_direct_call(single_process, monkeypatch):
    import torch
    import torch.distributed as dist

    from megatron_opdlm.training import resilience

    # the f91ed8a form of ranks_with, compiled as if it lived in training/resilience.py
    namespace = {"torch": torch, "dist": dist}
    source = (
        "def ranks_with(flag):\n"
        "    flags = torch.zeros(dist.get_world_size(), dtype=torch.int32)\n"
        "    dist.all_reduce(flags)\n"
        "    return []\n"
    )
    exec(compile(source, resilience.__file__, "exec"), namespace)
    monkeypatch.setattr(resilience, "ranks_with", namespace["ranks_with"])
    with guarded_collectives(), pytest.raises(AssertionError, match="training/resilience.py"):
        resilience.check_finite("loss", True, step=1, policy="stop")
