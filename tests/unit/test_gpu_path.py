"""The GPU-only choices, checked on the CPU: each is a function of its inputs (role, impl, TE
version, compute capability), or a behaviour the local spec can show.

- mask types per (role, impl), and the teacher's explicit causal + left-padding mask: the
  teacher under the TE choice (`arbitrary`, run here with the local core attention) gives each
  row of a ragged left-padded batch the targets of that row alone;
- FP8: only the student's training GEMMs by default (configs built with a faked TE / GPU),
  recipe, TE-version and capability errors, rollouts outside FP8, rows padded exactly;
- cached rollouts refused on TE < 2.2 at build time;
- one gradient norm per step, the same update as Megatron's optimizer.step().
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from packaging.version import Version

from megatron_opdlm.config import ParallelConfig, PrecisionConfig
from megatron_opdlm.data.prompts import PromptRecord
from megatron_opdlm.models import builder, specs
from megatron_opdlm.runtime import te_support
from megatron_opdlm.training import batches, steps
from tests.tiny import tiny_config

# ---- mask types ----


def test_mask_type_per_role_and_impl():
    expected = {
        ("teacher", "local"): AttnMaskType.causal,
        ("teacher", "transformer_engine"): AttnMaskType.arbitrary,  # never plain causal on TE
        ("student", "local"): AttnMaskType.arbitrary,
        ("student", "transformer_engine"): AttnMaskType.arbitrary,
    }
    for (role, impl), mask_type in expected.items():
        assert specs.attention_mask_type(role, impl) == mask_type, (role, impl)
        assert specs.needs_explicit_mask(role, impl) == (mask_type != AttnMaskType.causal)
    with pytest.raises(ValueError, match="role 'critic'"):
        specs.attention_mask_type("critic", "local")
    with pytest.raises(ValueError, match="impl 'cuda'"):
        specs.attention_mask_type("teacher", "cuda")


def test_the_te_layer_spec_carries_the_mask_type(monkeypatch):
    # The TE spec needs TE to build; its structure is the local one's, so the local builder
    # stands in for it and we read what layer_spec writes into the self-attention params.
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    monkeypatch.setattr(
        specs,
        "get_gpt_layer_with_transformer_engine_spec",
        lambda qk_layernorm: get_gpt_layer_local_spec(qk_layernorm=qk_layernorm),
    )
    model = tiny_config().model
    for role in specs.ROLES:
        for impl in specs.IMPLS:
            params = specs.layer_spec(model, impl, role).submodules.self_attention.params
            assert params["attn_mask_type"] == specs.attention_mask_type(role, impl)


def _ragged_batch(job):
    # prompts of 3, 7 and 5 tokens: rows 0 and 2 are left-padded; responses all 8 tokens
    generator = torch.Generator().manual_seed(0)
    records = []
    for index, length in enumerate((3, 7, 5)):
        ids = torch.randint(2, 120, (length + 8,), generator=generator).tolist()
        records.append(PromptRecord(f"r{index}", ids[:length], ids[length:]))
    return records


def _teacher_targets(teacher, records, job):
    """(packed micro-batch, teacher targets) of `records` on the model's device."""
    from megatron_opdlm.runtime.distributed import device

    rollout = batches.given_responses(records, job, 8, device())
    x_t = batches.select_noisy_states(rollout, job, step=0, first_row=0)
    job.train.micro_batch_size = len(records)
    (micro,) = batches.pack_rows(rollout, x_t, job, 0, len(records))
    return micro, steps.teacher_forward(teacher[0], micro, job, top_k=None)[1]


def test_teacher_under_the_te_mask_type_honours_left_padding(single_process, monkeypatch):
    job = tiny_config("distill.mode=offpolicy", "diffusion.block_size=4")
    torch.manual_seed(0)
    causal_teacher = builder.build_teacher(job)
    # The TE teacher's mask type, run with the local core attention (TE is GPU-only).
    monkeypatch.setattr(specs, "attention_mask_type", lambda role, impl: AttnMaskType.arbitrary)
    te_choice_teacher = builder.build_teacher(job)
    builder.copy_weights(causal_teacher, te_choice_teacher)
    seen = []
    te_choice_teacher[0].register_forward_pre_hook(lambda module, args: seen.append(args[2]))

    records = _ragged_batch(job)
    micro, targets = _teacher_targets(te_choice_teacher, records, job)
    # the mask passed is the explicit causal + key-padding one of the packed batch
    (mask,) = seen
    assert mask.shape == (3, 1, micro.teacher_tokens.shape[1], micro.teacher_tokens.shape[1])
    assert torch.equal(mask, micro.teacher_attention_mask)
    valid = micro.valid[:, : micro.teacher_tokens.shape[1]]  # [b, P + R]
    real_queries = valid[:, :, None] & ~valid[:, None, :]  # real query, pad key
    assert mask[:, 0][real_queries].all() and (~valid).any()
    # same targets as the causal teacher (the mask alone carries causality and padding) ...
    _, causal_targets = _teacher_targets(causal_teacher, records, job)
    torch.testing.assert_close(targets.logprobs, causal_targets.logprobs, rtol=0, atol=0)
    # ... and each row's targets are those of the row alone, unpadded: fp32 rounding only
    # (RoPE sees positions shifted by the padding; attention depends on their differences).
    for row, record in enumerate(records):
        _, alone = _teacher_targets(te_choice_teacher, [record], job)
        torch.testing.assert_close(targets.logprobs[row], alone.logprobs[0], rtol=1e-5, atol=1e-5)


def test_a_model_of_mask_type_arbitrary_refuses_a_missing_mask(single_process):
    student = builder.build_student(tiny_config())
    tokens = torch.randint(2, 120, (1, 8))
    with pytest.raises(ValueError, match="got no attention_mask"):
        student[0](tokens, torch.arange(8)[None], None)


# ---- Transformer Engine version, GPU capability, FP8 ----


def test_fp8_recipe_checks_name_the_version_the_capability_and_the_fix():
    hopper, ada, ampere, blackwell = (9, 0), (8, 9), (8, 0), (10, 0)
    te = Version
    te_support.check_fp8("delayed", te("1.13.0"), ada)
    te_support.check_fp8("tensorwise", te("2.2.0.dev0+abc"), hopper)
    te_support.check_fp8("blockwise", te("2.3.0"), hopper)
    te_support.check_fp8("mxfp8", te("2.1.0"), blackwell)
    cases = [
        ("delayed", None, hopper, "not installed"),
        ("tensorwise", te("2.1.0"), hopper, "Transformer Engine >= 2.2.0, this one is 2.1.0"),
        ("blockwise", te("2.2.0"), hopper, ">= 2.3.0"),
        ("mxfp8", te("2.5.0"), hopper, "compute capability >= 10.0, this one is 9.0"),
        ("delayed", te("2.5.0"), ampere, "this GPU has no FP8"),
        ("delayed", te("2.5.0"), None, "needs a CUDA GPU"),
        ("nvfp4", te("2.5.0"), hopper, "is not one of"),
    ]
    for recipe, version, capability, message in cases:
        with pytest.raises(ValueError, match=message):
            te_support.check_fp8(recipe, version, capability)


def test_cached_rollouts_need_te_2_2():
    te_support.check_cached_rollout(None)  # local spec: nothing to check
    te_support.check_cached_rollout(Version("2.2.0"))
    with pytest.raises(ValueError, match=r"2\.1\.1 is older than 2\.2.*use_kv_cache=false"):
        te_support.check_cached_rollout(Version("2.1.1"))


def test_the_student_build_refuses_old_te_for_cached_rollouts(single_process, monkeypatch):
    monkeypatch.setattr(builder, "resolve_transformer_impl", lambda precision: "transformer_engine")
    monkeypatch.setattr(te_support, "installed_te_version", lambda: Version("2.0.0"))
    with pytest.raises(ValueError, match="older than 2.2"):
        builder.build_student(tiny_config())


def _fake_gpu(monkeypatch, version="2.5.0", capability=(9, 0)):
    monkeypatch.setattr(builder, "resolve_transformer_impl", lambda precision: "transformer_engine")
    monkeypatch.setattr(te_support, "installed_te_version", lambda: Version(version))
    monkeypatch.setattr(te_support, "gpu_capability", lambda: capability)


def test_fp8_is_only_in_the_students_training_gemms_by_default(monkeypatch):
    _fake_gpu(monkeypatch)
    model, parallel = tiny_config().model, ParallelConfig()
    precision = PrecisionConfig(dtype="bf16", fp8="hybrid", fp8_recipe="delayed")
    student = builder.transformer_config(model, parallel, precision, "student")
    teacher = builder.transformer_config(model, parallel, precision, "teacher")
    assert (student.fp8, student.fp8_recipe, student.tp_only_amax_red) == (
        "hybrid",
        "delayed",
        False,
    )
    assert not teacher.fp8
    precision.fp8_teacher = True
    teacher = builder.transformer_config(model, parallel, precision, "teacher")
    # the teacher's forwards are data-dependent in number per DP rank (evaluation): TP-only amax
    assert teacher.fp8 == "hybrid" and teacher.tp_only_amax_red
    with pytest.raises(ValueError, match="capability >= 10.0"):
        mxfp8 = PrecisionConfig(dtype="bf16", fp8="e4m3", fp8_recipe="mxfp8")
        builder.transformer_config(model, parallel, mxfp8)


def test_fp8_config_errors_are_clear():
    with pytest.raises(ValueError, match="fp8_teacher=true needs precision.fp8"):
        PrecisionConfig(fp8_teacher=True).validate()
    with pytest.raises(ValueError, match="needs Transformer Engine"):
        PrecisionConfig(fp8="e4m3", transformer_impl="local").validate()


def test_rows_pad_to_tp_under_sp_and_to_the_fp8_multiple(monkeypatch):
    job = tiny_config()
    assert steps.row_multiple(job, "student") == 1
    job.parallel.tp, job.parallel.sequence_parallel = 2, True
    assert steps.row_multiple(job, "student") == 2
    job.precision.fp8, job.precision.fp8_recipe = "e4m3", "mxfp8"
    assert steps.row_multiple(job, "student") == 2 * 32  # rows per TP rank a multiple of 32
    assert steps.row_multiple(job, "teacher") == 2  # bf16 teacher
    job.parallel.sequence_parallel = False
    job.precision.fp8_recipe = "delayed"
    assert steps.row_multiple(job, "student") == 16


def test_column_padding_is_exact(single_process):
    job = tiny_config("diffusion.block_size=4", "distill.mode=offpolicy")
    torch.manual_seed(0)
    student = builder.build_student(job)
    records = _ragged_batch(job)
    rollout = batches.given_responses(records, job, 8, "cpu")
    x_t = batches.select_noisy_states(rollout, job, step=0, first_row=0)
    job.train.micro_batch_size = 3
    (micro,) = batches.pack_rows(rollout, x_t, job, 0, 3)
    s = micro.tokens.shape[1]
    padded = steps.pad_columns(micro.tokens, micro.position_ids, micro.attention_mask, 16)
    assert padded[0].shape[1] == -(-s // 16) * 16 > s
    with torch.no_grad():
        want = student[0](micro.tokens, micro.position_ids, micro.attention_mask)  # [b, S, V]
        got = student[0](*padded)[:, :s]
    # pad keys are masked for every real query: equal up to the GEMM blocking of another shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rollouts_never_run_in_fp8(single_process, monkeypatch):
    import contextlib

    from megatron.core.transformer import transformer_block

    from megatron_opdlm.diffusion.sampler import generate

    job = tiny_config("diffusion.block_size=4", "rollout.steps_per_block=2")
    student = builder.build_student(job)
    config = student[0].config
    config.fp8, config.fp8_recipe = "e4m3", "delayed"  # the student trains in FP8
    entered = []  # megatron-core's FP8 contexts (TE's fp8_autocast on a GPU), recorded

    def record(config, *args, **kwargs):
        entered.append(config.fp8)
        return contextlib.nullcontext()

    monkeypatch.setattr(transformer_block, "get_fp8_context", record)
    tokens = torch.randint(2, 120, (1, 8))
    with torch.no_grad():
        student[0](tokens, torch.arange(8)[None], torch.zeros(1, 1, 8, 8, dtype=torch.bool))
    assert entered == ["e4m3"]  # a training-style forward enters FP8 ...
    entered.clear()
    batch = generate(student, [[5, 6, 7]], job.model, job.diffusion, job.rollout,
                     max_new_tokens=8, generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert batch.response_tokens.shape == (1, 8)
    assert entered == []  # ... a rollout never does
    assert config.fp8 == "e4m3"  # restored after the rollout


# ---- one gradient norm per step ----


def _student_after_backward(job, micro):
    from megatron_opdlm.training.optimizer import build_optimizer, wrap_ddp

    torch.manual_seed(0)
    student = wrap_ddp(builder.build_student(job), job)
    optimizer = build_optimizer(job, student)
    for chunk in student:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    tokens = sum(m.num_loss_tokens for m in micro)
    steps.run_step(student, None, micro, job, tokens, sum(m.num_loss_sequences for m in micro))
    return student, optimizer


def test_one_grad_norm_per_step_gives_megatrons_update(single_process, monkeypatch):
    from megatron_opdlm.training.optimizer import grad_norm_then_step

    # mdlm_sft: a loss without a teacher; clip_grad small enough that clipping acts
    job = tiny_config("distill.mode=mdlm_sft", "diffusion.block_size=4", "optim.clip_grad=0.05")
    records = _ragged_batch(job)
    rollout = batches.given_responses(records, job, 8, "cpu")
    x_t = batches.select_noisy_states(rollout, job, step=0, first_row=0)
    job.train.micro_batch_size = 3
    micro = batches.pack_rows(rollout, x_t, job, 0, 3)

    reference, reference_optimizer = _student_after_backward(job, micro)
    stepped, reference_norm, _ = reference_optimizer.step()
    student, optimizer = _student_after_backward(job, micro)
    calls = []
    original = type(optimizer).get_grad_norm
    monkeypatch.setattr(type(optimizer), "get_grad_norm",
                        lambda self: calls.append(1) or original(self))  # fmt: skip
    checked = []
    ok, norm = grad_norm_then_step(optimizer, lambda n: checked.append(n) or True)
    assert ok and stepped and calls == [1] and checked == [norm]
    assert norm == pytest.approx(reference_norm, rel=1e-12) and norm > 0.05  # clipped
    for got, want in zip(student[0].parameters(), reference[0].parameters(), strict=True):
        assert torch.equal(got, want)  # the same operations in the same order

    student, optimizer = _student_after_backward(job, micro)
    before = [p.detach().clone() for p in student[0].parameters()]
    ok, _ = grad_norm_then_step(optimizer, lambda n: False)  # e.g. a non-finite norm
    assert not ok
    assert all(torch.equal(p, q) for p, q in zip(student[0].parameters(), before))


# ---- metrics: one all-reduce of fixed keys ----


def test_metric_keys_are_those_of_distill_loss_and_reduce_like_summarize(single_process):
    from megatron_opdlm.distill.loss import distill_loss, metric_keys, summarize_metrics
    from megatron_opdlm.distill.targets import teacher_targets
    from megatron_opdlm.training.metrics import reduce_loss_metrics

    job = tiny_config("diffusion.block_size=4", "distill.mode=offpolicy")
    records = _ragged_batch(job)
    rollout = batches.given_responses(records, job, 8, "cpu")
    x_t = batches.select_noisy_states(rollout, job, step=0, first_row=0)
    job.train.micro_batch_size = 1
    micro = batches.pack_rows(rollout, x_t, job, 0, 3)
    torch.manual_seed(0)
    with_teacher, without = [], []
    for part in micro:
        student_logits = torch.randn(1, part.response_length, 128)
        targets = teacher_targets(torch.randn(1, part.prompt_length + part.response_length, 128),
                                  part, job.model, None)  # fmt: skip
        n = sum(m.num_loss_tokens for m in micro)
        with_teacher.append(distill_loss(student_logits, targets, part, job.distill, n,
                                         model_cfg=job.model, group=None)[1])  # fmt: skip
        job.distill.mode = "mdlm_sft"
        without.append(distill_loss(student_logits, None, part, job.distill, n,
                                    model_cfg=job.model, group=None)[1])  # fmt: skip
        job.distill.mode = "offpolicy"
    assert sorted(with_teacher[0]) == metric_keys(True)
    assert sorted(without[0]) == metric_keys(False)
    reduced = reduce_loss_metrics(with_teacher, with_teacher=True)
    summary = summarize_metrics(with_teacher)
    assert reduced.keys() == summary.keys()
    for key in summary:
        assert reduced[key] == pytest.approx(summary[key], rel=1e-12, nan_ok=True), key
    assert reduce_loss_metrics([], with_teacher=True) == {}


# ---- the process-group timeout is a config field ----


def test_the_process_group_timeout_comes_from_the_config(monkeypatch):
    import datetime

    import torch.distributed as dist

    from megatron_opdlm.runtime import distributed

    with pytest.raises(ValueError, match="timeout_minutes=0"):
        ParallelConfig(timeout_minutes=0).validate()
    seen = {}

    class Started(Exception):
        pass

    def init_process_group(**kwargs):
        seen.update(kwargs)
        raise Started  # stop before any real rendezvous

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    with pytest.raises(Started):
        distributed.initialize(ParallelConfig(timeout_minutes=90))
    assert seen["timeout"] == datetime.timedelta(minutes=90)


def test_evaluated_models_are_built_without_fp8():
    """A job trained with FP8 evaluates in its parameter dtype (evaluation/models.job_for)."""
    from megatron_opdlm.evaluation.models import job_for

    job = tiny_config()
    precision = PrecisionConfig(dtype="bf16", fp8="hybrid", fp8_teacher=True,
                                transformer_impl="transformer_engine")  # fmt: skip
    eval_job = job_for(job.model, job.diffusion, precision=precision)
    assert (eval_job.precision.fp8, eval_job.precision.fp8_teacher) == ("none", False)
    assert precision.fp8 == "hybrid"  # the caller's config is left as it was
    assert eval_job.precision.dtype == "bf16"
