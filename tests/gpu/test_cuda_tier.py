"""Bare CUDA tier: CUDA torch + megatron-core + our pure-Python dependencies (no Transformer
Engine, no NGC image). `make test-gpu`; about a minute on one H100 after the install.

Local spec on CUDA with NCCL at world size 1 (enough to catch a host tensor in a collective:
NCCL refuses CPU tensors), a bf16 OPDLM run whose loss falls, the teacher on a ragged left-padded
batch, cached == no-cache rollouts, the rollout engine's lean layers (== the sampler in fp32, ==
megatron's layers in bf16), exact resume, and the time and memory of a step (printed).
"""

from __future__ import annotations

import dataclasses
import os
import signal

import pytest
import torch

from tests.gpu.gpu_support import falls, gpu_overrides, measured, requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]


def test_host_value_collectives_run_on_nccl(single_process):
    import torch.distributed as dist

    from megatron_opdlm.runtime import collectives

    assert "nccl" in str(dist.get_backend()).lower()
    assert collectives.comm_device().type == "cuda"
    assert collectives.all_reduce_values([3, True]) == [3, 1]
    assert collectives.all_reduce_values([0.5], op="max") == [0.5]
    assert collectives.any_rank(True) and collectives.ranks_where(True) == [0]
    assert collectives.gather_strings("x") == ["x"]
    tensor = torch.ones(2, device=collectives.comm_device())
    assert collectives.broadcast_tensor_(tensor, src=0).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="move it with"):  # refused before NCCL sees it
        collectives.broadcast_tensor_(torch.ones(2), src=0)


def test_bf16_opdlm_training_on_cuda_learns_and_reports_a_step(single_process, tmp_path):
    from megatron_opdlm.training.trainer import Trainer
    from tests.collective_guard import guarded_collectives
    from tests.unit.test_training_support import tiny_job

    job = tiny_job(tmp_path, *gpu_overrides("distill.mode=opdlm", "train.rollout_steps=8"))
    report = {}
    with guarded_collectives() as seen:  # every tensor of a collective on comm_device (CUDA)
        trainer = Trainer(job)
        with measured("8 rollout steps (16 optimizer steps), bf16", report):
            result = trainer.train()
    assert any(module == "runtime/collectives.py" for module, _ in seen)
    losses = [r["loss"] for r in result.history if not r["skipped"]]
    assert len(losses) == 16 and all(torch.isfinite(torch.tensor(losses)))
    # measured on the CPU in fp32: 20-60 % lower after 16 steps; bf16 rounding is far smaller
    assert falls(losses, 0.9), losses
    last = result.history[-1]
    print(f"\n[gpu] one optimizer step: rollout {last['time_rollout']:.3f} s, teacher + "
          f"student {last['time_forward_backward']:.3f} s, optimizer "
          f"{last['time_optimizer']:.3f} s, peak memory {last['memory_gib']:.3f} GiB")  # fmt: skip
    assert next(trainer.models.student[0].parameters()).is_cuda


def test_teacher_on_a_ragged_left_padded_batch_on_cuda(single_process):
    from megatron_opdlm.models import builder
    from tests.tiny import tiny_config
    from tests.unit.test_gpu_path import _ragged_batch, _teacher_targets

    job = tiny_config(*gpu_overrides("distill.mode=offpolicy", "diffusion.block_size=4",
                                     "model.init_method_std=0.3", dtype="fp32"))  # fmt: skip
    torch.manual_seed(0)
    teacher = builder.build_teacher(job)
    records = _ragged_batch(job)
    _, targets = _teacher_targets(teacher, records, job)
    assert targets.logprobs.is_cuda
    for row, record in enumerate(records):
        _, alone = _teacher_targets(teacher, [record], job)
        # fp32 on CUDA; other batch shapes pick other GEMM kernels (and TF32 where enabled)
        torch.testing.assert_close(targets.logprobs[row], alone.logprobs[0], rtol=1e-3, atol=1e-3)


def test_cached_rollout_gives_the_no_cache_greedy_tokens_on_cuda(single_process):
    from megatron_opdlm.diffusion.sampler import generate
    from megatron_opdlm.models.builder import build_student
    from tests.tiny import tiny_config

    job = tiny_config(*gpu_overrides("rollout.temperature=0", "rollout.remasking=static",
                                     dtype="fp32"))  # fmt: skip
    torch.manual_seed(0)
    student = build_student(job)
    with torch.no_grad():  # sharp distributions (as in tests/unit/test_sampler.py): no near-ties
        student[0].output_layer.weight.mul_(30.0)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24]]  # ragged: left padding
    tokens = {}
    for cache in (True, False):
        rollout = dataclasses.replace(job.rollout, use_kv_cache=cache)
        batch = generate(student, prompts, job.model, job.diffusion, rollout, max_new_tokens=16)
        tokens[cache] = batch.response_tokens.cpu()
    assert torch.equal(tokens[True], tokens[False])


def test_rollout_engine_lean_layers_on_cuda(single_process, monkeypatch):
    """The rollout engine on CUDA (slot cache, lean layer forward with the builder's GPU fusions,
    per-slot RoPE, 2 slots for 3 ragged prompts: a refill): fp32 greedy tokens equal the
    lock-step sampler's; bf16 tokens and every round's logits equal the engine's own run on
    megatron's layers (the same operations: bit-equal)."""
    import contextlib

    from megatron_opdlm.diffusion import engine
    from megatron_opdlm.diffusion.lean_layer import lean_supported
    from megatron_opdlm.diffusion.sampler import generate
    from megatron_opdlm.models.builder import build_student
    from tests.tiny import tiny_config

    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24]]

    def student_for(dtype):
        job = tiny_config(*gpu_overrides("rollout.temperature=0", "rollout.remasking=static",
                                         dtype=dtype))  # fmt: skip
        torch.manual_seed(0)
        student = build_student(job)
        assert all(lean_supported(layer) for layer in student[0].decoder.layers)
        with torch.no_grad():  # sharp distributions: no near-ties between the two decoders
            student[0].output_layer.weight.mul_(30.0)
        return job, student

    def rollout(job, student):
        rounds = []
        batch = engine.generate_rollout(
            student, prompts, job.model, job.diffusion, job.rollout, 16, slots=2,
            round_callback=lambda *args: rounds.append(args[3].float().cpu()),
        )  # fmt: skip
        return batch.response_tokens.cpu(), rounds

    job, student = student_for("fp32")
    want = generate(student, prompts, job.model, job.diffusion, job.rollout, 16)
    assert torch.equal(rollout(job, student)[0], want.response_tokens.cpu())
    job, student = student_for("bf16")
    lean_tokens, lean_rounds = rollout(job, student)
    monkeypatch.setattr(engine, "lean_layers", lambda chunks: contextlib.nullcontext())
    tokens, rounds = rollout(job, student)
    assert torch.equal(lean_tokens, tokens)
    assert len(lean_rounds) == len(rounds)
    assert all(torch.equal(a, b) for a, b in zip(lean_rounds, rounds, strict=True))


def test_checkpoint_save_and_exact_resume_on_cuda(single_process, tmp_path, monkeypatch):
    """4 rollout steps straight == 2 steps, SIGUSR1, resume for 2; deterministic kernels
    (the Makefile sets CUBLAS_WORKSPACE_CONFIG, which deterministic cuBLAS needs)."""
    from megatron_opdlm.training.trainer import Trainer
    from tests.unit.test_training_support import assert_checkpoints_equal, tiny_job

    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") is None:
        pytest.skip("set CUBLAS_WORKSPACE_CONFIG=:4096:8 (make test-gpu does) for exact resume")
    common = gpu_overrides("distill.mode=opdlm", "parallel.use_distributed_optimizer=true")
    straight_dir, split_dir = tmp_path / "straight", tmp_path / "split"
    torch.use_deterministic_algorithms(True, warn_only=True)  # ops without one: a warning
    try:
        want = Trainer(tiny_job(tmp_path, *common, f"checkpoint.save_dir={straight_dir}")).train()
        first = Trainer(tiny_job(tmp_path, *common, f"checkpoint.save_dir={split_dir}"))
        original = first._rollout_step

        def step_then_signal():
            history = original()
            if first.rollout_step == 1:
                os.kill(os.getpid(), signal.SIGUSR1)
            return history

        monkeypatch.setattr(first, "_rollout_step", step_then_signal)
        stopped = first.train()
        assert stopped.stopped_early == "signal SIGUSR1"
        rest = Trainer(tiny_job(tmp_path, *common, f"checkpoint.save_dir={split_dir}")).train()
    finally:
        torch.use_deterministic_algorithms(False)
    got = stopped.history + rest.history
    assert [r["loss"] for r in got] == [r["loss"] for r in want.history]
    assert_checkpoints_equal(straight_dir / "iter_0000004", split_dir / "iter_0000004")
