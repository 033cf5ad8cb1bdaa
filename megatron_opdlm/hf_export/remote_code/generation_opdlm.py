"""`generate` of an exported OPDLM student: block-diffusion decoding, transformers-style outputs.

    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=64)        # greedy
    out = model.generate(..., remasking="dynamic", threshold=0.9)                   # faster
    out = model.generate(..., do_sample=True, temperature=0.7, top_p=0.9, generator=g)
    out = model.generate(..., return_dict_in_generate=True, output_logits=True)

Batches must be left-padded (attention_mask 0 on the left only). Each row stops after the block
holding its first EOS, or when a stop string / stopping criterion fires (checked as blocks are
committed); tokens after a row's end are pad_token_id. `max_new_tokens` need not be a multiple
of the block size: whole blocks are decoded and the output cut. Defaults come from
config.opdlm["decoding"], then these arguments, then a `generation_config` passed in.
Returns `sequences` [b, P + n] (or GenerateDecoderOnlyOutput with `logits` / `scores`: one
[b, V] tensor per new position, those of the round that unmasked it, plus `num_forwards` and
`step_map`). A streamer receives the prompt, then each committed block (batch 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .block_diffusion import DecodeSettings, decode


@dataclass
class BlockDiffusionGenerateOutput(GenerateDecoderOnlyOutput):
    """GenerateDecoderOnlyOutput plus the decoding cost of each row."""

    num_forwards: torch.Tensor | None = None  # [b] model forwards (denoising rounds) per row
    step_map: torch.Tensor | None = None  # [b, n] round (within its block) unmasking each token


_UNSUPPORTED = ("num_beams", "num_return_sequences", "assistant_model", "prefix_allowed_tokens_fn")


def _as_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class BlockDiffusionGenerationMixin:
    """Overrides GenerationMixin.generate with block-diffusion decoding."""

    def _opdlm_settings(self, gen_cfg, kw) -> tuple[DecodeSettings, int]:
        cfg = self.config
        defaults = cfg.decoding_defaults

        def pick(name, fallback):
            if kw.get(name) is not None:
                return kw[name]
            if (
                gen_cfg is not None
                and getattr(gen_cfg, name, None) is not None
                and name in ("do_sample", "temperature", "top_k", "top_p", "max_new_tokens")
            ):
                return getattr(gen_cfg, name)
            return defaults.get(name, fallback)

        do_sample = bool(pick("do_sample", False))
        temperature = float(pick("temperature", 1.0)) if do_sample else 0.0
        if do_sample and temperature == 0:
            do_sample = False
        opdlm = cfg.opdlm
        settings = DecodeSettings(
            block_size=cfg.block_size,
            token_shift=cfg.token_shift,
            mask_token_id=cfg.mask_token_id,
            vocab_size=int(opdlm.get("vocab_size", cfg.vocab_size)),
            steps_per_block=int(pick("steps_per_block", cfg.block_size)),
            remasking=str(pick("remasking", "static")),
            threshold=float(pick("threshold", 0.9)),
            temperature=temperature,
            top_k=int(pick("top_k", 0) or 0) if do_sample else 0,
            top_p=float(pick("top_p", 1.0) or 1.0) if do_sample else 1.0,
            use_cache=bool(pick("use_cache", True)),
        )
        settings.validate()
        max_new = int(pick("max_new_tokens", 64))
        if max_new < 1:
            raise ValueError(f"max_new_tokens={max_new} must be >= 1")
        return settings, max_new

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config=None,
        stopping_criteria=None,
        streamer=None,
        *,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        remasking: str | None = None,
        threshold: float | None = None,
        steps_per_block: int | None = None,
        use_cache: bool | None = None,
        eos_token_id=None,
        pad_token_id: int | None = None,
        stop_strings: str | list[str] | None = None,
        tokenizer=None,
        generator: torch.Generator | None = None,
        return_dict_in_generate: bool | None = None,
        output_logits: bool | None = None,
        output_scores: bool | None = None,
        input_ids: torch.Tensor | None = None,
        **kwargs,
    ):
        """Block-diffusion decoding (see the module docstring)."""
        if input_ids is None:
            input_ids = inputs
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError("generate() needs input_ids [batch, prompt length >= 1]")
        for name in _UNSUPPORTED:
            if kwargs.get(name) not in (None, 1):
                raise ValueError(f"{name} is not supported by block-diffusion generate()")
        kwargs.pop("output_attentions", None), kwargs.pop("output_hidden_states", None)
        for name in list(kwargs):
            if name in _UNSUPPORTED or kwargs[name] is None:
                kwargs.pop(name)
        if kwargs:
            raise ValueError(f"generate() got unsupported arguments {sorted(kwargs)}")
        gen_cfg = generation_config
        settings, max_new = self._opdlm_settings(
            gen_cfg,
            dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                 top_k=top_k, top_p=top_p, remasking=remasking, threshold=threshold,
                 steps_per_block=steps_per_block, use_cache=use_cache),
        )  # fmt: skip
        device = self.get_input_embeddings().weight.device
        input_ids = input_ids.to(device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        valid = attention_mask.to(device).bool()  # [b, P]
        if valid.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(valid.shape)} != input_ids {input_ids.shape}")
        if (valid[:, 1:].long() - valid[:, :-1].long()).min() < 0 or not valid[:, -1].all():
            raise ValueError(
                "attention_mask has padding on the right: block-diffusion generate() needs left "
                "padding (tokenizer.padding_side = 'left')"
            )
        if (input_ids[valid] == settings.mask_token_id).any():
            raise ValueError(f"input_ids contain the mask token id {settings.mask_token_id}")
        eos = _as_list(
            eos_token_id if eos_token_id is not None else getattr(gen_cfg, "eos_token_id", None)
        ) or _as_list(self.config.eos_token_id)
        if not eos:
            raise ValueError("no eos_token_id: pass eos_token_id= (a response could never end)")
        pad = pad_token_id if pad_token_id is not None else getattr(gen_cfg, "pad_token_id", None)
        pad = int(
            pad
            if pad is not None
            else (self.config.pad_token_id if self.config.pad_token_id is not None else eos[0])
        )
        block = settings.block_size
        num_blocks = -(-max_new // block)
        if input_ids.shape[1] + num_blocks * block > self.config.max_position_embeddings:
            raise ValueError(
                f"prompt ({input_ids.shape[1]} columns) + {num_blocks * block} new tokens exceeds "
                f"max_position_embeddings={self.config.max_position_embeddings}"
            )
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings needs tokenizer= to decode the response")
        prompt = torch.where(valid, input_ids, pad)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        streamed = [0]

        def on_block(response, lengths, active):
            stop = torch.zeros_like(active)
            if streamer is not None:
                new = response[0, streamed[0] : min(int(lengths[0]), max_new)]
                if new.numel():
                    streamer.put(new.cpu())
                streamed[0] += new.numel()
            if stopping_criteria is not None:
                sequences = torch.cat([prompt, response], dim=1)
                stop |= torch.as_tensor(stopping_criteria(sequences, None), device=stop.device)
            if stop_strings:
                for row in torch.nonzero(active).flatten().tolist():
                    text = tokenizer.decode(response[row, : int(lengths[row])])
                    stop[row] |= any(s in text for s in stop_strings)
            stop |= lengths >= max_new
            return stop

        want_logits = bool(output_logits or output_scores) and bool(return_dict_in_generate)
        was_training = self.training
        self.eval()
        try:
            result = decode(self, prompt, valid, settings, num_blocks, eos, pad, generator,
                            keep_logits=want_logits, on_block=on_block)  # fmt: skip
        finally:
            self.train(was_training)
        if streamer is not None:
            streamer.end()
        width = min(max_new, int(result.lengths.max()) if result.lengths.numel() else 0)
        new_tokens = result.response[:, :width]
        sequences = torch.cat([input_ids, new_tokens], dim=1)
        if not return_dict_in_generate:
            return sequences
        logits = scores = None
        if want_logits:
            logits = tuple(result.logits[:, i] for i in range(width)) if output_logits else None
            scores = tuple(result.scores[:, i] for i in range(width)) if output_scores else None
        return BlockDiffusionGenerateOutput(
            sequences=sequences,
            scores=scores,
            logits=logits,
            num_forwards=result.num_forwards,
            step_map=result.step_map[:, :width],
        )
