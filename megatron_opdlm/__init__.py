"""megatron-opdlm: autoregressive LLMs into block-diffusion LLMs by on-policy distillation (OPDLM),
on Megatron-Core (TP/PP/DP, Transformer Engine on GPUs, local spec + gloo on CPUs)."""

__version__ = "0.1.0"
