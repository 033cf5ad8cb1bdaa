"""A run through every megatron-core path the CPU patches exist for; used by test_cpu_compat.

Run as a script (a fresh process, since patches are process-global):
    OPDLM_CPU_COMPAT_SKIP=rng python -m tests.unit.cpu_compat_scenario
"""

from __future__ import annotations

import torch


def main() -> None:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_opdlm.models.builder import build_model_chunks
    from megatron_opdlm.runtime import distributed
    from tests.tiny import tiny_config

    config = tiny_config()
    distributed.initialize(config.parallel, seed=3)  # rng: CUDA RNG tracker
    # a trainable causal model (the teacher's spec, not frozen): a None mask is the default one
    (model,) = build_model_chunks(config, "teacher")  # current_device: buffers on current_device()
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True),
        module=model,
    )
    optimizer = get_megatron_optimizer(  # type_names: param.type() checks
        OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0, use_distributed_optimizer=True),
        [ddp],
    )
    tokens = torch.randint(2, 120, (2, 8))
    positions = torch.arange(8).expand(2, -1)
    logits = ddp(tokens, positions, None)  # cuda_literals: default causal mask on "cuda"
    logits.float().square().mean().backward()
    ddp.finish_grad_sync()  # streams: torch.cuda streams/events in the grad buffer
    optimizer.step()
    distributed.shutdown()
    print("scenario ok")


if __name__ == "__main__":
    main()
