"""Configs of exported OPDLM students: the family's config under its own model_type.

A block-diffusion student has the tensors of its AR family but must not be decoded as an AR
model, so its model_type ("opdlm_llama", ...) is one plain transformers does not know: loading
it without trust_remote_code fails instead of silently decoding left to right.
The `opdlm` dict records how to decode it (see OpdlmConfigMixin).
"""

from __future__ import annotations

from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config


class OpdlmConfigMixin:
    """Accessors of the `opdlm` section written by megatron-opdlm's exporter.

    opdlm = {family, block_size, token_shift, mask_token_id, vocab_size (tokenizer rows; the
    mask row may follow), decoding: {remasking, threshold, steps_per_block, temperature, top_k,
    top_p, max_new_tokens}}
    """

    def _opdlm(self) -> dict:
        section = getattr(self, "opdlm", None)
        if not isinstance(section, dict) or "block_size" not in section:
            raise ValueError(
                "config.json has no 'opdlm' section with block_size: this is not an exported "
                "megatron-opdlm student"
            )
        return section

    @property
    def block_size(self) -> int:
        return int(self._opdlm()["block_size"])

    @property
    def mask_token_id(self) -> int:
        return int(self._opdlm()["mask_token_id"])

    @property
    def token_shift(self) -> bool:
        return bool(self._opdlm()["token_shift"])

    @property
    def decoding_defaults(self) -> dict:
        return dict(self._opdlm().get("decoding") or {})


class OpdlmLlamaConfig(OpdlmConfigMixin, LlamaConfig):
    model_type = "opdlm_llama"


class OpdlmQwen2Config(OpdlmConfigMixin, Qwen2Config):
    model_type = "opdlm_qwen2"


class OpdlmQwen3Config(OpdlmConfigMixin, Qwen3Config):
    model_type = "opdlm_qwen3"


class OpdlmMistralConfig(OpdlmConfigMixin, MistralConfig):
    model_type = "opdlm_mistral"
