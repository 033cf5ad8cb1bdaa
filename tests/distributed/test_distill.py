"""Vocab-parallel distillation loss against the one-process reference, in one 4-rank spawn.

- TP=4, then TP=2 (x DP=2): loss and gradient on the student's logits equal TP=1 for every
  divergence, sparse top-K targets and the mdlm cross-entropy; every tensor created on a rank
  during the loss (forward and backward) is recorded and none has a full-vocabulary dimension.
- DP=2 x 2 micro-batches (with TP=2) vs DP=1 x 1 batch: identical loss and identical gradients
  of an output-layer weight after Megatron's reduction (schedule divides by micro-batches, DDP
  averages over DP).
Float64 throughout, so "identical" is to rounding error (rtol 1e-10): the sharded sums reorder
the additions, nothing else differs.

The groups are plain torch.distributed groups laid out as Megatron's parallel_state lays them
out (TP = consecutive ranks, DP = strided): the loss code takes its groups explicitly, and not
importing megatron-core in 4 processes saves ~20 s of start-up on a 2-core machine.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed

VOCAB_SIZE = 45  # padded to 48 with the mask row: 48 must not occur as any other dimension
CASES = [
    ("forward_kl", {}, None),
    ("reverse_kl", {}, None),
    ("mixed_kl", {"mixed_kl_weight": 0.3}, None),
    ("jsd", {"jsd_beta": 0.3}, None),
    ("topk_forward_kl", {"top_k": 5}, 5),  # sparse targets from the teacher forward
    ("topk_forward_kl", {"top_k": 5, "topk_renormalize": True}, None),  # derived from full
    ("mdlm_sft", {"mode": "mdlm_sft"}, None),
]


def _setup():
    from megatron_opdlm.config import DiffusionConfig, ModelConfig
    from megatron_opdlm.diffusion.packing import pack_batch
    from megatron_opdlm.diffusion.states import select_states
    from tests.unit.test_states import make_rollout

    model = ModelConfig(vocab_size=VOCAB_SIZE, vocab_pad_multiple=8, eos_token_ids=[1])
    rollout = make_rollout([3, 5, 2, 4], [8, 7, 8, 3], 5, 8, 4, 4, vocab=VOCAB_SIZE, seed=11)
    mask_id = model.student_mask_token_id
    x_t = select_states(rollout, "per_block", 4, mask_id, 4, torch.Generator().manual_seed(0))
    packed = pack_batch(rollout, x_t, model, DiffusionConfig(block_size=4), exclude_eos=False)
    g = torch.Generator().manual_seed(1)
    v, b, s = model.padded_vocab_size, packed.batch_size, packed.tokens.shape[1]
    student = 2 * torch.randn(b, s, v, generator=g, dtype=torch.float64)
    teacher = 2 * torch.randn(
        b, packed.teacher_tokens.shape[1], v, generator=g, dtype=torch.float64
    )
    return model, packed, student, teacher


def _loss(model, packed, student, teacher, case, group, n_global):
    from megatron_opdlm.config import DistillConfig
    from megatron_opdlm.distill.loss import distill_loss
    from megatron_opdlm.distill.targets import teacher_targets

    name, overrides, top_k = case
    cfg = DistillConfig(divergence=name if name != "mdlm_sft" else "forward_kl", **overrides)
    targets = None
    if cfg.mode != "mdlm_sft":
        targets = teacher_targets(teacher, packed, model, top_k=top_k, group=group)
    loss, _ = distill_loss(student, targets, packed, cfg, n_global, model_cfg=model, group=group)
    return loss


class _ShapeRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape of every tensor an op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in torch.utils._pytree.tree_leaves(out):
            if isinstance(item, torch.Tensor):
                self.shapes.add(tuple(item.shape))
        return out


def _groups(tp: int):
    """(tp_group, tp_rank, dp_group, dp_rank) of this rank, Megatron's layout."""
    import torch.distributed as dist

    world, me = dist.get_world_size(), dist.get_rank()
    mine = {}
    for first in range(0, world, tp):  # every rank creates every group, in the same order
        ranks = list(range(first, first + tp))
        group = dist.new_group(ranks)
        if me in ranks:
            mine["tp"] = (group, ranks.index(me))
    for offset in range(tp):
        ranks = list(range(offset, world, tp))
        group = dist.new_group(ranks)
        if me in ranks:
            mine["dp"] = (group, ranks.index(me))
    return (*mine["tp"], *mine["dp"])


def _check_tensor_parallel(tp: int, groups) -> dict:
    model, packed, student, teacher = _setup()
    v = model.padded_vocab_size
    group, rank = groups[0], groups[1]
    width = v // tp
    cols = slice(rank * width, (rank + 1) * width)
    n = packed.num_loss_tokens
    assert n not in (v, v // 2, v // 4) and packed.batch_size * packed.response_length != v
    errors = {}
    for case in CASES:
        full = student.clone().requires_grad_()
        reference = _loss(model, packed, full, teacher, case, None, n)
        (reference_grad,) = torch.autograd.grad(reference, full)

        local = student[..., cols].clone().requires_grad_()
        recorder = _ShapeRecorder()
        with recorder:
            loss = _loss(model, packed, local, teacher[..., cols], case, group, n)
            (grad,) = torch.autograd.grad(loss, local)
        torch.testing.assert_close(loss, reference, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(grad, reference_grad[..., cols], rtol=1e-10, atol=1e-13)
        full_width = sorted(shape for shape in recorder.shapes if v in shape)
        assert not full_width, f"{case}: full-vocabulary tensors on a TP={tp} rank: {full_width}"
        assert any(width in shape for shape in recorder.shapes)  # the recorder saw the shards
        errors[f"{case[0]}{'-renorm' if case[1].get('topk_renormalize') else ''}"] = float(
            (grad - reference_grad[..., cols]).abs().max()
        )
    return errors


def _check_data_parallel(groups) -> dict:
    """TP=2 x DP=2, 2 micro-batches of 1 row per DP rank, vs one process with the 4-row batch."""
    import torch.distributed as dist

    from megatron_opdlm.config import DistillConfig
    from megatron_opdlm.diffusion.packing import split_micro_batches
    from megatron_opdlm.distill.loss import distill_loss
    from megatron_opdlm.distill.targets import teacher_targets

    model, packed, _, teacher = _setup()
    v, hidden_size = model.padded_vocab_size, 6
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(packed.batch_size, packed.tokens.shape[1], hidden_size, generator=g,
                         dtype=torch.float64)  # fmt: skip
    weight = torch.randn(v, hidden_size, generator=g, dtype=torch.float64)  # output layer [V, h]
    cfg = DistillConfig()

    # reference: one process, whole batch, whole vocabulary
    ref_weight = weight.clone().requires_grad_()
    targets = teacher_targets(teacher, packed, model, group=None)
    n_total = packed.num_loss_tokens
    ref_loss, _ = distill_loss(hidden @ ref_weight.T, targets, packed, cfg, n_total,
                               model_cfg=model, group=None)  # fmt: skip
    ref_loss.backward()

    tp_group, tp_rank, dp_group, dp_rank = groups
    dp_size = dist.get_world_size(dp_group)
    assert (dist.get_world_size(tp_group), dp_size) == (2, 2)
    cols = slice(tp_rank * v // 2, (tp_rank + 1) * v // 2)
    local_weight = weight[cols].clone().requires_grad_()  # [V/tp, h], a ColumnParallelLinear shard
    rows = slice(2 * dp_rank, 2 * dp_rank + 2)
    my_batch = packed.rows(rows.start, rows.stop)
    micro_batches = split_micro_batches(my_batch, 1)
    n_global = torch.tensor(sum(m.num_loss_tokens for m in micro_batches))
    dist.all_reduce(n_global, group=dp_group)
    assert int(n_global) == n_total
    step_loss = torch.zeros((), dtype=torch.float64)
    for index, micro in enumerate(micro_batches):
        row = rows.start + index
        micro_targets = teacher_targets(
            teacher[row : row + 1, :, cols], micro, model, group=tp_group
        )
        # the trainer's contract: loss / global tokens, no rescaling by the schedule
        # (calculate_per_token_loss) and gradients summed over DP (DDP scaling factor 1)
        output, metrics = distill_loss(hidden[row : row + 1] @ local_weight.T, micro_targets,
                                       micro, cfg, int(n_global), model_cfg=model,
                                       group=tp_group)  # fmt: skip
        output.backward()
        step_loss += metrics["loss"]
    grad = local_weight.grad.clone()
    dist.all_reduce(grad, group=dp_group)
    dist.all_reduce(step_loss, group=dp_group)
    torch.testing.assert_close(step_loss, ref_loss.detach(), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(grad, ref_weight.grad[cols], rtol=1e-10, atol=1e-13)
    return {"loss_error": float((step_loss - ref_loss.detach()).abs()),
            "grad_error": float((grad - ref_weight.grad[cols]).abs().max())}  # fmt: skip


def _body(rank, world_size):
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    out = {}
    for tp in (4, 2):
        groups = _groups(tp)
        out[f"tp{tp}"] = _check_tensor_parallel(tp, groups)
    out["dp2_mb2"] = _check_data_parallel(groups)  # TP=2 x DP=2
    dist.destroy_process_group()
    return out


@pytest.mark.distributed
def test_vocab_parallel_loss_and_data_parallel_normalisation():
    results = run_distributed(_body, world_size=4)
    for result in results:
        assert set(result) == {"tp4", "tp2", "dp2_mb2"}
        assert max(result["tp4"].values()) < 1e-10
        assert result["dp2_mb2"]["grad_error"] < 1e-10


def test_shape_recorder_sees_full_vocabulary_tensors_without_tp():
    """The recorder is able to fail: one process (TP=1) creates [n, V] tensors."""
    model, packed, student, teacher = _setup()
    recorder = _ShapeRecorder()
    with recorder:
        _loss(model, packed, student.requires_grad_(), teacher, CASES[0], None, 10)
    assert any(model.padded_vocab_size in shape for shape in recorder.shapes)
