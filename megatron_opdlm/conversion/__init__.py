"""Hugging Face <-> Megatron checkpoint conversion (the checkpoint directory format itself lives
in megatron_opdlm/checkpoint_layout.py).

hf_config        config.json <-> ModelConfig / DiffusionConfig, supported families
families         per-family tensor mappings (data); mappings: the mapping kinds
hf_to_megatron   streaming HF safetensors -> torch_dist writer (memory: one chunk)
megatron_to_hf   streaming torch_dist -> sharded HF safetensors export
verify           logits / KL / argmax / greedy parity with transformers
smollm2          the shipped SmolLM2-135M teacher as an HF directory
synthetic        tiny random HF models (tests), 8B-shaped synthetic checkpoints (benchmarks)
"""
