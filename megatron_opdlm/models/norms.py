"""RMSNorm for the local (non-Transformer-Engine) layer spec.

Megatron's local spec falls back to torch.nn.RMSNorm when Apex is absent, and that wrapper refuses
sequence parallelism. This one computes the same function (torch's fused rms_norm) and marks its
weight `sequence_parallel`, so finalize_model_grads all-reduces its gradient over the TP group
when activations are sequence-sharded.
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.eps = eps
        self.hidden_size = hidden_size
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # query/key norms act on per-head features that are not sequence-sharded; megatron
        # reduces their gradients by name (q_layernorm / k_layernorm) instead.
        is_qk_norm = hidden_size == config.kv_channels and hidden_size != config.hidden_size
        self.weight.sequence_parallel = bool(config.sequence_parallel) and not is_qk_norm

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., h] -> [..., h]
        return torch.nn.functional.rms_norm(hidden, (self.hidden_size,), self.weight, self.eps)
