"""Hugging Face export of a block-diffusion student: remote code, config and model card."""
