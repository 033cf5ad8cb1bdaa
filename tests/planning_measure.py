"""Measure what the code allocates on this rank for one layout, next to the planner's prediction.

Used by tests/unit/test_planning.py (one process) and tests/distributed/test_planning_dist.py
(gloo). Model state: build the student with the project's builder, wrap it in Megatron DDP, build
the optimizer and allocate its state (`prime_optimizer_state`, a real torch Adam step); sum the
unique storages. Activations: one forward of each of this rank's chunks over a packed row
[prompt | x0 | x_t] (the trainer's projection on the last stage) under saved-tensor hooks.
KV cache: the rollout's `CachedBlockForward` prefill allocates the cache; sum its tensors.
"""

from __future__ import annotations

import copy

import torch

from megatron_opdlm.planning import memory, params
from megatron_opdlm.planning.gpus import gpu_by_name
from megatron_opdlm.planning.measure import SavedTensorBytes, model_state_bytes

PROMPT, RESPONSE, BATCH = 8, 16, 2  # packed row S = 40, micro-batch 2


def request(job, dp: int, recompute: str = "none") -> memory.PlanRequest:
    job = copy.deepcopy(job)
    job.train.micro_batch_size = BATCH  # the measured forward's rows
    return memory.PlanRequest(
        job=job, dp=dp, prompt_length=PROMPT, response_length=RESPONSE,
        gpu=gpu_by_name("h100-80g"), recompute=recompute, attention="dense", impl="local",
    )  # fmt: skip


def measure_state(job) -> dict:
    from megatron_opdlm.models.builder import build_student
    from megatron_opdlm.training.optimizer import (
        _inner_optimizers,
        build_optimizer,
        prime_optimizer_state,
        wrap_ddp,
    )

    ddp = wrap_ddp(build_student(job), job)
    optimizer = build_optimizer(job, ddp)
    for inner in _inner_optimizers(optimizer):
        prime_optimizer_state(inner)
    real = model_state_bytes(ddp, optimizer)
    return {"weights": real.weights, "grads": real.grads, "optimizer": real.optimizer}


def predict_state(job, dp: int, tp_rank: int, pp_rank: int, dp_rank: int) -> dict:
    state = params.student_state_bytes(job, dp, tp_rank, pp_rank, dp_rank)
    return {"weights": state.weights, "grads": state.grads, "optimizer": state.optimizer}


def _packed_row(job):
    from megatron_opdlm.models.masks import packed_row_mask, xt_logit_columns

    generator = torch.Generator().manual_seed(0)
    seq = PROMPT + 2 * RESPONSE
    tokens = torch.randint(2, job.model.vocab_size, (BATCH, seq), generator=generator)
    valid = torch.ones(BATCH, seq, dtype=torch.bool)
    mask, positions = packed_row_mask(PROMPT, RESPONSE, job.diffusion.block_size, valid)
    columns = xt_logit_columns(PROMPT, RESPONSE, job.diffusion.block_size, False)
    return tokens, positions, mask, columns


def measure_activations(job) -> int:
    """Saved-for-backward bytes of one forward of every chunk on this rank."""
    from megatron.core import parallel_state

    from megatron_opdlm.models.builder import build_student
    from megatron_opdlm.training.optimizer import unwrap
    from megatron_opdlm.training.steps import _projection

    chunks = build_student(job)
    tokens, positions, mask, columns = _packed_row(job)
    dtype = next(chunks[0].parameters()).dtype
    # one recorder for all chunks: they share the micro-batch's mask, as in the schedule
    exclude = [p for chunk in chunks for p in chunk.parameters()]
    saved = SavedTensorBytes(exclude=exclude)
    outputs = []  # kept alive: freed graphs would let storages (and data_ptrs) be reused
    for vp_stage, chunk in enumerate(chunks):
        gpt = unwrap(chunk)
        vp = vp_stage if job.parallel.vpp else None
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp)
        if not first:  # what the previous stage would send: [s, b, h]
            hidden = torch.randn(tokens.shape[1], BATCH, job.model.hidden_size, dtype=dtype)
            gpt.set_input_tensor(hidden.requires_grad_())
        kwargs = _projection(columns) if last else {}
        with saved:
            outputs.append(chunk(tokens if first else None, positions, mask, **kwargs))
    return saved.bytes


def predict_activations(job, dp: int, pp_rank: int, recompute: str) -> int:
    req = request(job, dp, recompute)
    count = params.rank_counts(job, "student")[(0, pp_rank)]
    return memory.student_activation_bytes(req, count, pp_rank)


def measure_kv_cache(job) -> int:
    """Bytes of the BlockKVCache after the rollout's prefill of BATCH prompts."""
    from megatron_opdlm.diffusion.block_forward import CachedBlockForward
    from megatron_opdlm.diffusion.model_runner import ModelRunner
    from megatron_opdlm.models.builder import build_student

    chunks = build_student(job)
    for chunk in chunks:
        chunk.eval()
    prompt = torch.randint(2, job.model.vocab_size, (BATCH, PROMPT))
    key_valid = torch.ones(BATCH, PROMPT + RESPONSE, dtype=torch.bool)
    with torch.no_grad():
        forward = CachedBlockForward(
            ModelRunner(chunks), prompt, key_valid, job.diffusion.block_size, False
        )
    tensors = [t for kv in forward.cache.context.key_value_memory_dict.values() for t in kv]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    forward.cache.free()
    return nbytes


def predict_kv_cache(job, dp: int, pp_rank: int) -> int:
    count = params.rank_counts(job, "student")[(0, pp_rank)]
    return memory.kv_cache_bytes(request(job, dp), count.layers, rows=BATCH)
