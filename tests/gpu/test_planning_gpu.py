"""Planner vs `torch.cuda.max_memory_allocated` of one OPDLM training step on a GPU.

A ~0.5B-parameter bf16 Transformer Engine pair (8 layers, h=2048, GQA 16/4, vocab 32000), one
rollout step of 4 prompts with 256-token responses and one optimizer step. The predicted peak
(the planner's tensor peak, without the context/fragmentation allowance, which
max_memory_allocated does not see) must be within 15% of the measured peak (the issue's bar).

Skipped without CUDA and Transformer Engine (CI and the CPU machines have neither). Not yet run
on a GPU by this project (no GPU was available when it was written).
"""

from __future__ import annotations

import pytest
import torch

from megatron_opdlm.models.specs import transformer_engine_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not transformer_engine_available(), reason="needs a CUDA GPU and transformer-engine"
    ),
]

RTOL = 0.15  # the bar for predicted vs measured peak on a GPU
MODEL = ["model.num_layers=8", "model.hidden_size=2048", "model.ffn_hidden_size=5632",
         "model.num_attention_heads=16", "model.num_query_groups=4", "model.vocab_size=32000",
         "model.vocab_pad_multiple=128", "model.max_position_embeddings=1024",
         "precision.dtype=bf16", "precision.transformer_impl=transformer_engine"]  # fmt: skip


def test_predicted_peak_within_15_percent_of_one_training_step(tmp_path):
    from megatron_opdlm.planning.gpus import custom_gpu
    from megatron_opdlm.planning.inputs import request_from_job
    from megatron_opdlm.planning.memory import plan_memory
    from megatron_opdlm.runtime import distributed
    from megatron_opdlm.training.trainer import Trainer
    from tests.unit.test_training_support import tiny_job

    job = tiny_job(tmp_path, *MODEL, "rollout.max_new_tokens=256", "train.rollout_steps=1",
                   "train.prompts_per_rollout=4", "train.global_batch_size=4",
                   "train.micro_batch_size=2", "train.preflight=false")  # fmt: skip
    distributed.initialize(job.parallel, seed=job.train.seed)
    try:
        trainer = Trainer(job)
        # the planner's P is the longest prompt: the rollout pads every row to it
        job.data.max_prompt_length = max(len(r.prompt_ids) for r in trainer.train_data.records)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        trainer.train()
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated()
    finally:
        distributed.shutdown()
    gpu = custom_gpu(torch.cuda.get_device_properties(0).total_memory / 1e9)
    plan = plan_memory(request_from_job(job, 1, gpu, 1))
    predicted = plan.worst.peak
    error = abs(predicted - measured) / measured
    print(f"measured {measured / 2**30:.2f} GiB predicted {predicted / 2**30:.2f} GiB "
          f"({plan.worst.peak_phase}) error {error:.1%}")  # fmt: skip
    assert error <= RTOL, (measured, predicted, plan.worst.phases)
