"""Exported OPDLM students: the family's transformers model with block-diffusion `generate`.

The weights, tensor names and forward are the family's own (LlamaForCausalLM, ...); a forward
with a 4D attention mask runs any block-diffusion mask. `generate` decodes block by block
(block_diffusion.decode), the way the student was trained, and returns the standard outputs.
"""

from __future__ import annotations

from transformers import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

from .configuration_opdlm import (
    OpdlmLlamaConfig,
    OpdlmMistralConfig,
    OpdlmQwen2Config,
    OpdlmQwen3Config,
)
from .generation_opdlm import BlockDiffusionGenerationMixin


class OpdlmLlamaForCausalLM(BlockDiffusionGenerationMixin, LlamaForCausalLM):
    config_class = OpdlmLlamaConfig


class OpdlmQwen2ForCausalLM(BlockDiffusionGenerationMixin, Qwen2ForCausalLM):
    config_class = OpdlmQwen2Config


class OpdlmQwen3ForCausalLM(BlockDiffusionGenerationMixin, Qwen3ForCausalLM):
    config_class = OpdlmQwen3Config


class OpdlmMistralForCausalLM(BlockDiffusionGenerationMixin, MistralForCausalLM):
    config_class = OpdlmMistralConfig
