"""TP=2 (with and without sequence parallel), PP=2, PP=2 x VPP=2, DP=2 and TP2 x PP2: student
logits and gradients equal the one-process model with the same weights.

Weights travel through megatron's dist_checkpointing (saved at TP=PP=1, loaded at the layout);
gradients come back the same way (written into the parameters, saved at the layout, loaded at
TP=PP=1), so every parameter's gradient is compared whole. The loss is linear in the
vocab-parallel logits, sum(logits * W) / micro-batches, which each TP rank computes on its own
vocab shard: the gradient reaching the shared hidden states is then the all-reduced one, and
nothing in the test gathers the vocabulary except the logits comparison itself.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from megatron_opdlm.models import masks
from tests.dist_utils import run_distributed
from tests.tiny import tiny_config

pytestmark = pytest.mark.distributed

BATCH, PROMPT, RESPONSE, BLOCK = 4, 4, 8, 4
SEQ = PROMPT + 2 * RESPONSE
# fp32 tolerances: TP splits matmul reductions over hidden/ffn and all-reduces partial sums, DP sums
# per-rank gradients, PP only moves tensors. Logits differ by ~1e-6 at most. Gradients of the tied
# embedding sum b*s outer products (values ~0.3) in another order: up to 5e-6 absolute, 2e-5
# relative measured, so gradients are compared with a relative tolerance.
LOGITS_ATOL, GRAD_ATOL, GRAD_RTOL = 2e-5, 1e-5, 1e-4


def _config(tp=1, pp=1, vpp=None, sequence_parallel=False):
    overrides = ["model.num_layers=4", "model.tie_word_embeddings=true",
                 f"parallel.tp={tp}", f"parallel.pp={pp}"]  # fmt: skip
    if vpp:
        overrides.append(f"parallel.vpp={vpp}")
    if sequence_parallel:
        overrides.append("parallel.sequence_parallel=true")
    return tiny_config(*overrides)


def _batch(vocab_padded: int):
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(2, 120, (BATCH, SEQ), generator=generator)
    valid = torch.ones(BATCH, SEQ, dtype=torch.bool)
    valid[1, :2] = False  # a left-padded prompt
    tokens[1, :2] = 0
    mask, positions = masks.packed_row_mask(PROMPT, RESPONSE, BLOCK, valid)
    weight = torch.randn(BATCH, SEQ, vocab_padded, generator=generator)  # [b, s, V]
    return tokens, positions, mask, weight


def _save_weights(chunks, directory):
    from megatron.core import dist_checkpointing

    os.makedirs(directory, exist_ok=True)
    state = {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
    dist_checkpointing.save(state, directory)


def _load_weights(chunks, directory):
    from megatron.core import dist_checkpointing

    state = {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
    loaded = dist_checkpointing.load(state, directory)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"chunk{i}"])


def _run_layout(tp, pp, vpp, sp, weights_dir, grads_dir):
    """Inside a rank: build, load, forward/backward through megatron's schedules."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_opdlm.models.builder import build_student
    from megatron_opdlm.models.vocab import local_vocab_range
    from megatron_opdlm.runtime import distributed

    config = _config(tp, pp, vpp, sp)
    distributed.initialize(config.parallel, seed=99)
    chunks = build_student(config)
    _load_weights(chunks, weights_dir)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    chunks = [
        DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk)
        for chunk in chunks
    ]
    tokens, positions, mask, weight = _batch(config.model.padded_vocab_size)
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    rows = list(range(dp_rank, BATCH, dp_size))  # this DP rank's sequences, one per micro-batch
    start, end = local_vocab_range(config.model)
    logits_out: dict[int, torch.Tensor] = {}

    def loss_func(row, output):  # output [1, s, V/tp]
        logits_out[row] = output.detach()
        loss = (output * weight[row : row + 1, :, start:end]).sum()
        return loss, {"loss": loss.detach()}

    def forward_step(data_iterator, model):
        row = next(data_iterator)
        sl = slice(row, row + 1)
        output = model(tokens[sl], positions[sl], mask[sl])
        return output, functools.partial(loss_func, row)

    iterators = [iter(rows) for _ in chunks] if len(chunks) > 1 else iter(rows)
    for chunk in chunks:
        chunk.zero_grad_buffer()
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=chunks,
        num_microbatches=len(rows),
        seq_length=SEQ,
        micro_batch_size=1,
        forward_only=False,
    )
    finalize_model_grads(chunks)
    # gradients into the parameters, saved at this layout, compared whole by the caller
    with torch.no_grad():
        for chunk in chunks:
            for param in chunk.module.parameters():
                param.copy_(param.main_grad)
    _save_weights([chunk.module for chunk in chunks], grads_dir)

    gathered = {}
    if parallel_state.is_pipeline_last_stage():
        group = parallel_state.get_tensor_model_parallel_group()
        for row, local in logits_out.items():
            parts = [torch.empty_like(local) for _ in range(tp)]
            torch.distributed.all_gather(parts, local.contiguous(), group=group)
            gathered[row] = torch.cat(parts, dim=-1)[0]  # [s, V]
    # keep the process group: the next layout re-partitions the same ranks
    parallel_state.destroy_model_parallel()
    return gathered


def _layouts_body(rank, world_size, layouts, tmp):
    results = []
    for name, tp, pp, vpp, sp in layouts:
        logits = _run_layout(tp, pp, vpp, sp, f"{tmp}/weights", f"{tmp}/grads_{name}")
        results.append(logits)
    return results


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, TP=PP=1: weights saved for every layout, logits and full grads kept."""
    from megatron_opdlm.models.builder import build_student
    from megatron_opdlm.runtime import distributed

    tmp = tmp_path_factory.mktemp("model_parallel")
    config = _config()
    distributed.initialize(config.parallel, seed=1234)
    (student,) = build_student(config)
    _save_weights([student], tmp / "weights")
    tokens, positions, mask, weight = _batch(config.model.padded_vocab_size)
    logits = student(tokens, positions, mask)  # [b, s, V]
    ((logits * weight).sum() / BATCH).backward()  # one micro-batch per sequence
    grads = {name: p.grad.detach().clone() for name, p in student.named_parameters()}
    distributed.shutdown()
    return tmp, logits.detach(), grads


def _check_grads(tmp, layout_name, reference_grads):
    from megatron_opdlm.models.builder import build_student
    from megatron_opdlm.runtime import distributed

    config = _config()
    distributed.initialize(config.parallel, seed=5)
    (model,) = build_student(config)
    _load_weights([model], tmp / f"grads_{layout_name}")
    try:
        for name, param in model.named_parameters():
            torch.testing.assert_close(
                param.detach(), reference_grads[name], rtol=GRAD_RTOL, atol=GRAD_ATOL,
                msg=lambda m, n=name: f"{layout_name}: grad of {n}: {m}",
            )  # fmt: skip
    finally:
        distributed.shutdown()


def _check_logits(per_rank_results, index, reference_logits, layout_name):
    seen = set()
    for rank_results in per_rank_results:
        for row, logits in rank_results[index].items():
            torch.testing.assert_close(
                logits, reference_logits[row], rtol=0, atol=LOGITS_ATOL,
                msg=lambda m, r=row: f"{layout_name}: logits of row {r}: {m}",
            )  # fmt: skip
            seen.add(row)
    assert seen == set(range(BATCH)), f"{layout_name}: rows {sorted(seen)} came back"


def test_two_rank_layouts_match_single_process(reference):
    tmp, reference_logits, reference_grads = reference
    layouts = [
        ("tp2", 2, 1, None, False),
        ("tp2_sp", 2, 1, None, True),
        ("pp2", 1, 2, None, False),
        ("pp2_vpp2", 1, 2, 2, False),
        ("dp2", 1, 1, None, False),
    ]
    results = run_distributed(_layouts_body, world_size=2, args=(layouts, str(tmp)))
    for index, (name, *_) in enumerate(layouts):
        _check_logits(results, index, reference_logits, name)
        _check_grads(tmp, name, reference_grads)


def test_tp2_pp2_four_ranks_match_single_process(reference):
    tmp, reference_logits, reference_grads = reference
    layouts = [("tp2_pp2", 2, 2, None, False)]
    results = run_distributed(_layouts_body, world_size=4, args=(layouts, str(tmp)))
    _check_logits(results, 0, reference_logits, "tp2_pp2")
    _check_grads(tmp, "tp2_pp2", reference_grads)
