"""Block diffusion: the sampler (rollout and inference), state selection, training-row packing."""
