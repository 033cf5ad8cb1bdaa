"""Build the frozen AR teacher and the block-diffusion student from one config.

Both are Megatron-Core GPTModels with the same architecture and padded vocabulary. The teacher is
causal (through its mask, see `models.specs.attention_mask_type`), in eval mode, without
gradients, and in `precision.dtype` unless `precision.fp8_teacher` (FP8 is for the student's
training GEMMs; the sampler switches it off for rollouts, `diffusion.model_runner.fp8_off`).
The student has block-causal attention (mask type
`arbitrary`, fed the masks of `models.masks`), an optional mask-token row initialised to the mean
embedding, and is trained. With pipeline parallelism each rank builds its stage (and its virtual
stages for interleaved schedules): the result is always a list of model chunks.
"""

from __future__ import annotations

import importlib.util
import math

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_opdlm.config import JobConfig, ModelConfig, ParallelConfig, PrecisionConfig
from megatron_opdlm.models.flex_attention import resolve_attention_backend
from megatron_opdlm.models.rope import install_positioned_rope
from megatron_opdlm.models.specs import (
    block_spec,
    needs_explicit_mask,
    resolve_transformer_impl,
)
from megatron_opdlm.models.vocab import init_mask_token_row
from megatron_opdlm.runtime import cpu_compat, te_support

# the one map from config dtype names to torch dtypes (training, conversion, tools)
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gradient_accumulation_fusion_available() -> bool:
    """Megatron's fused wgrad accumulation: CUDA plus Apex's fused_weight_gradient_mlp_cuda
    (the GPTModel output layer is Megatron's own ColumnParallelLinear under either spec)."""
    return (
        torch.cuda.is_available()
        and importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None
    )


def fp8_for(role: str, precision: PrecisionConfig) -> bool:
    """FP8 in `role`'s GEMMs: the student's when precision.fp8 is set, the teacher's only with
    precision.fp8_teacher."""
    if precision.fp8 == "none":
        return False
    return role == "student" or precision.fp8_teacher


def transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    role: str = "student",
) -> TransformerConfig:
    """Megatron TransformerConfig for the architecture, layout and numerics of `role`."""
    impl = resolve_transformer_impl(precision)
    on_gpu = torch.cuda.is_available()
    fp8 = {}
    if fp8_for(role, precision):
        te_support.check_fp8(
            precision.fp8_recipe, te_support.installed_te_version(), te_support.gpu_capability()
        )
        fp8 = dict(
            # The teacher's forwards run a data-dependent number of times per DP rank (held-out
            # evaluation splits prompts unevenly): its delayed-scaling amax is reduced over TP
            # only, never over ranks that may not take part.
            tp_only_amax_red=role == "teacher",
            fp8=precision.fp8,
            fp8_recipe=precision.fp8_recipe,
            fp8_margin=precision.fp8_margin,
            fp8_amax_history_len=precision.fp8_amax_history_len,
            fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
        )
    recompute = {}
    if precision.recompute == "full":
        recompute = dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    elif precision.recompute == "selective":  # core attention only (megatron's "core_attn")
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=TORCH_DTYPES[precision.dtype],
        bf16=precision.dtype == "bf16",
        fp16=precision.dtype == "fp16",
        pipeline_dtype=TORCH_DTYPES[precision.dtype],
        use_cpu_initialization=not on_gpu,
        # Fusions need CUDA kernels (Apex / TE); the local spec on a CPU runs unfused.
        gradient_accumulation_fusion=gradient_accumulation_fusion_available(),
        masked_softmax_fusion=on_gpu and impl == "transformer_engine",
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=on_gpu and impl == "transformer_engine",
        persist_layer_norm=on_gpu,
        deallocate_pipeline_outputs=on_gpu,
        **fp8,
        **recompute,
        **cpu_compat.transformer_config_overrides(),
    )


def _llama3_inv_freq(model: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies with Llama-3 scaling, all four parameters honoured (GPTModel
    fixes low/high factors and the original length to Llama-3.1's values)."""
    dim = model.kv_channels
    inv_freq = 1.0 / (model.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if model.rope_scaling != "llama3":
        return inv_freq
    factor, low, high = (
        model.rope_scaling_factor,
        model.rope_low_freq_factor,
        model.rope_high_freq_factor,
    )
    old_len = model.rope_original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def _build_chunk(
    config: JobConfig, tconfig: TransformerConfig, role: str, vp_stage: int | None
) -> GPTModel:
    impl = resolve_transformer_impl(config.precision)
    backend = resolve_attention_backend(config.precision.attention_backend, impl)
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=block_spec(
            config.model, impl, role, tconfig, vp_stage, attention_backend=backend
        ),
        vocab_size=config.model.padded_vocab_size,
        max_sequence_length=config.model.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        parallel_output=True,
        share_embeddings_and_output_weights=config.model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(config.model.rope_theta),
        vp_stage=vp_stage,
    )
    if getattr(model, "rotary_pos_emb", None) is not None:
        install_positioned_rope(model, _llama3_inv_freq(config.model))
    return model


def build_model_chunks(config: JobConfig, role: str) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage) for `role`."""
    if role not in ("teacher", "student"):
        raise ValueError(f"role {role!r} must be 'teacher' or 'student'")
    impl = resolve_transformer_impl(config.precision)
    if impl == "transformer_engine" and role == "student" and config.rollout.use_kv_cache:
        te_support.check_cached_rollout(te_support.installed_te_version())
    tconfig = transformer_config(config.model, config.parallel, config.precision, role)
    vpp = config.parallel.vpp
    stages = range(vpp) if vpp else [None]
    chunks: list[torch.nn.Module] = []
    for vp_stage in stages:
        chunk = _build_chunk(config, tconfig, role, vp_stage)
        if needs_explicit_mask(role, impl):
            chunk.register_forward_pre_hook(_require_mask, with_kwargs=True)
        if tconfig.bf16 or tconfig.fp16:
            chunk = Float16Module(tconfig, chunk)
        if torch.cuda.is_available():
            chunk = chunk.cuda()
        chunks.append(chunk)
    return chunks


def _require_mask(module, args, kwargs):
    """A model of mask type `arbitrary` is not causal without a mask: refuse attention_mask=None
    (GPTModel.forward(input_ids, position_ids, attention_mask, ...))."""
    mask = args[2] if len(args) > 2 else kwargs.get("attention_mask")
    if mask is None:
        raise ValueError(
            f"{type(module).__name__} has attention mask type 'arbitrary' and got no "
            "attention_mask: pass an explicit [b, 1, s, s] mask (models.masks.causal_mask(valid) "
            "for causal rows)"
        )


def build_teacher(config: JobConfig) -> list[torch.nn.Module]:
    """Frozen causal AR model: eval mode, no gradients (and so no optimizer state)."""
    chunks = build_model_chunks(config, "teacher")
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    return chunks


def build_student(config: JobConfig) -> list[torch.nn.Module]:
    """Block-diffusion student, same architecture; mask-token row starts at the mean embedding."""
    chunks = build_model_chunks(config, "student")
    init_mask_token_row(chunks, config.model)
    return chunks


def copy_weights(source: list[torch.nn.Module], target: list[torch.nn.Module]) -> None:
    """Copy parameters chunk by chunk (same layout), e.g. teacher -> student initialisation."""
    with torch.no_grad():
        for src, dst in zip(source, target, strict=True):
            dst.load_state_dict(src.state_dict(), strict=True)
