"""Run configuration: one dataclass per component, YAML files plus dotted overrides.

    config = load_config("examples/configs/demo_smollm2.yaml", ["parallel.tp=2"])

Section checks live in each `validate()`; `JobConfig.validate()` adds the checks that involve
several sections (heads vs TP, layers vs PP, vocab padding vs TP, block size vs lengths).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from megatron_opdlm import config_base
from megatron_opdlm.config_base import doc, section
from megatron_opdlm.data.tokenizer import check_template_kwargs


@dataclass
class ModelConfig:
    """Decoder-only transformer architecture (Llama / Qwen2 / Qwen3 / Mistral families)."""

    family: Literal["llama", "qwen2", "qwen3", "mistral"] = doc(
        "llama", "architecture family; selects the HF conversion mapping"
    )
    num_layers: int = doc(2, "number of transformer layers")
    hidden_size: int = doc(64, "model width")
    ffn_hidden_size: int = doc(128, "MLP inner width (per gate/up projection)")
    num_attention_heads: int = doc(4, "query heads")
    num_query_groups: int = doc(2, "key/value heads (GQA groups); equal to heads for MHA")
    head_dim: int | None = doc(
        None, "per-head width; None means hidden_size / heads (Qwen3 differs)"
    )
    vocab_size: int = doc(128, "tokenizer vocabulary size (rows that are real tokens)")
    vocab_pad_multiple: int = doc(
        128, "embedding rows are padded to a multiple of this; must be divisible by parallel.tp"
    )
    mask_token_id: int | None = doc(
        None,
        "the student's mask token; None adds a row at id vocab_size (inside the padded vocab). "
        "Qwen3 can name one of its unused padded rows instead",
    )
    eos_token_ids: list[int] = doc([1], "end-of-sequence token ids (any ends a response)")
    pad_token_id: int = doc(0, "token used for left/right padding (never attended to)")
    max_position_embeddings: int = doc(2048, "longest sequence the model is built for")
    rope_theta: float = doc(10000.0, "RoPE base")
    rope_scaling: Literal["none", "llama3"] = doc("none", "RoPE frequency scaling scheme")
    rope_scaling_factor: float = doc(8.0, "llama3 scaling: factor")
    rope_low_freq_factor: float = doc(1.0, "llama3 scaling: low_freq_factor")
    rope_high_freq_factor: float = doc(4.0, "llama3 scaling: high_freq_factor")
    rope_original_max_position_embeddings: int = doc(
        8192, "llama3 scaling: original_max_position_embeddings"
    )
    norm_eps: float = doc(1e-5, "RMSNorm epsilon")
    qk_layernorm: bool = doc(False, "RMSNorm on queries and keys per head (Qwen3)")
    qkv_bias: bool = doc(False, "bias on the QKV projection (Qwen2/2.5)")
    tie_word_embeddings: bool = doc(False, "output layer shares the input embedding")
    init_method_std: float = doc(0.02, "std of random initialisation (tests, from-scratch runs)")

    @property
    def kv_channels(self) -> int:
        return (
            self.head_dim
            if self.head_dim is not None
            else self.hidden_size // self.num_attention_heads
        )

    @property
    def adds_mask_row(self) -> bool:
        return self.mask_token_id is None

    @property
    def student_mask_token_id(self) -> int:
        return self.vocab_size if self.mask_token_id is None else self.mask_token_id

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows of teacher and student alike (the same, so vocab shards line up)."""
        rows = self.vocab_size + (1 if self.adds_mask_row else 0)
        return int(math.ceil(rows / self.vocab_pad_multiple) * self.vocab_pad_multiple)

    def validate(self) -> None:
        positive = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                    "num_query_groups", "vocab_size", "vocab_pad_multiple")  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be positive")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"model.num_query_groups={self.num_query_groups}"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}; set model.head_dim"
            )
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.padded_vocab_size:
            raise ValueError(
                f"model.mask_token_id={self.mask_token_id} is outside the padded vocabulary "
                f"[0, {self.padded_vocab_size}); leave it None to add a row"
            )
        for token in [*self.eos_token_ids, self.pad_token_id]:
            if not 0 <= token < self.vocab_size:
                raise ValueError(
                    f"special token id {token} is outside model.vocab_size={self.vocab_size}"
                )
        if not self.eos_token_ids:
            raise ValueError("model.eos_token_ids is empty: a response could never end")


@dataclass
class DiffusionConfig:
    """How the student differs from the teacher."""

    block_size: int = doc(4, "block size B of the block-causal attention")
    token_shift: bool = doc(
        False, "predict token i from position i-1 (the AR head's convention, Fast-dLLM v2)"
    )

    def validate(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"diffusion.block_size={self.block_size} must be >= 1")


@dataclass
class ParallelConfig:
    """Parallel layout shared by teacher and student (colocated)."""

    tp: int = doc(1, "tensor-parallel size")
    pp: int = doc(1, "pipeline-parallel size")
    vpp: int | None = doc(None, "virtual pipeline stages per rank (interleaved 1F1B); None = off")
    sequence_parallel: bool = doc(False, "shard activations along the sequence in TP regions")
    use_distributed_optimizer: bool = doc(False, "shard optimizer state over data-parallel ranks")
    overlap_grad_reduce: bool = doc(False, "overlap DP gradient reduce with the backward pass")
    backend: Literal["auto", "nccl", "gloo"] = doc(
        "auto", "process-group backend; auto: nccl on GPU"
    )
    timeout_minutes: float = doc(
        30.0, "process-group timeout: a collective waiting longer fails the job (e.g. a save)"
    )

    def validate(self) -> None:
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if self.vpp is not None and (self.vpp < 2 or self.pp < 2):
            raise ValueError(
                f"parallel.vpp={self.vpp} needs parallel.pp >= 2 (got {self.pp}) and vpp >= 2"
            )
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel=true needs parallel.tp > 1")
        if self.timeout_minutes <= 0:
            raise ValueError(f"parallel.timeout_minutes={self.timeout_minutes} must be > 0")


@dataclass
class PrecisionConfig:
    """Numerics and layer implementation."""

    dtype: Literal["fp32", "bf16", "fp16"] = doc("fp32", "parameter / activation dtype")
    fp8: Literal["none", "e4m3", "hybrid"] = doc("none", "FP8 format (Transformer Engine only)")
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = doc(
        "delayed",
        "FP8 scaling: delayed (amax history), tensorwise (current scaling, TE >= 2.2), "
        "blockwise (TE >= 2.3, Hopper), mxfp8 (TE >= 2.1, Blackwell)",
    )
    fp8_teacher: bool = doc(
        False,
        "also run the teacher's forwards in FP8 (amax reduced over TP only); by default FP8 is "
        "only in the student's training GEMMs and the teacher and rollouts run in dtype",
    )
    fp8_amax_history_len: int = doc(1024, "delayed scaling: amax history length")
    fp8_amax_compute_algo: Literal["max", "most_recent"] = doc("max", "delayed scaling: amax algo")
    fp8_margin: int = doc(0, "delayed scaling: margin")
    transformer_impl: Literal["auto", "transformer_engine", "local"] = doc(
        "auto", "layer spec: auto = Transformer Engine when CUDA and TE import, else local"
    )
    recompute: Literal["none", "full", "selective"] = doc(
        "none",
        "activation recompute: full = whole layers; selective = core attention only (keeps the "
        "linears' activations, recomputes the S x S-sized part; megatron's core_attn module)",
    )
    attention_backend: Literal["auto", "flex", "te", "local"] = doc(
        "auto",
        "core attention: flex = FlexAttention on the block-diffusion mask predicates, no S x S "
        "tensor on GPUs (models.flex_attention); te = TEDotProductAttention; local = megatron's "
        "DotProductAttention; auto = flex on a GPU, else the layer implementation's own core",
    )

    def validate(self) -> None:
        if self.attention_backend == "te" and self.transformer_impl == "local":
            raise ValueError(
                "precision.attention_backend=te needs precision.transformer_impl="
                "transformer_engine (or auto on a GPU with TE); use flex or local"
            )
        if self.fp8 != "none" and self.transformer_impl == "local":
            raise ValueError(
                f"precision.fp8={self.fp8} needs Transformer Engine layers; "
                "set precision.transformer_impl=transformer_engine (or auto on a GPU with TE)"
            )
        if self.fp8_teacher and self.fp8 == "none":
            raise ValueError("precision.fp8_teacher=true needs precision.fp8 (e4m3 or hybrid)")


@dataclass
class RolloutConfig:
    """The student's block-diffusion sampler (rollout and inference share it)."""

    steps_per_block: int = doc(4, "denoising rounds per block at most")
    remasking: str = doc("dynamic", "unmasking strategy: static | dynamic (a registry)")
    threshold: float = doc(0.9, "dynamic: unmask every position whose confidence exceeds this")
    temperature: float = doc(1.0, "sampling temperature; 0 = greedy")
    top_k: int = doc(0, "sample from the k most likely tokens; 0 = off")
    top_p: float = doc(1.0, "nucleus sampling mass; 1 = off")
    max_new_tokens: int = doc(64, "response length cap when no curriculum is active")
    use_kv_cache: bool = doc(True, "encode committed blocks once (exact; much faster)")
    slots: int = doc(
        0,
        "rollout engine slots per DP rank: sequences decoded at once (continuous batching: a "
        "finished one frees its slot for the next prompt; KV memory grows with slots); 0 = one "
        "per prompt",
    )
    pipeline_microbatches: int = doc(
        0,
        "with PP: micro-batches of slots pipelined through the stages during rollout (stages "
        "work on different micro-batches at once); 0 = auto (PP micro-batches where the first "
        "rounds measure a gain, else whole-batch rounds), 1 = off, M = M micro-batches",
    )

    def validate(self) -> None:
        if self.steps_per_block < 1:
            raise ValueError(f"rollout.steps_per_block={self.steps_per_block} must be >= 1")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"rollout.threshold={self.threshold} must be in (0, 1]")
        if self.temperature < 0:
            raise ValueError(f"rollout.temperature={self.temperature} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"rollout.top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"rollout.top_k={self.top_k} must be >= 0")
        if self.slots < 0:
            raise ValueError(f"rollout.slots={self.slots} must be >= 0 (0 = one per prompt)")
        if self.pipeline_microbatches < 0:
            raise ValueError(
                f"rollout.pipeline_microbatches={self.pipeline_microbatches} must be >= 0 "
                "(0 = auto, 1 = off)"
            )


@dataclass
class DistillConfig:
    """What the student learns from and how the loss is formed."""

    mode: Literal["opdlm", "opdlm_off", "offpolicy", "mdlm_sft"] = doc(
        "opdlm", "opdlm | opdlm_off (own x0, random masks) | offpolicy (teacher x0) | mdlm_sft (CE)"
    )
    divergence: str = doc(
        "forward_kl", "forward_kl | reverse_kl | mixed_kl | jsd | topk_forward_kl (a registry)"
    )
    jsd_beta: float = doc(0.5, "JSD interpolation weight beta")
    mixed_kl_weight: float = doc(0.5, "mixed_kl: weight of the forward KL (rest reverse)")
    top_k: int = doc(16, "topk_forward_kl: teacher tokens kept")
    topk_renormalize: bool = doc(
        False, "renormalise the teacher's top-K probabilities (the reference OPDLM does not)"
    )
    state_selection: Literal["per_block", "global"] = doc(
        "per_block", "one round drawn per block, or one global round (the paper's Algorithm 1)"
    )
    exclude_eos: bool = doc(False, "drop the end-of-sequence token itself from the loss")
    normalization: Literal["global_tokens", "sequence_mean"] = doc(
        "global_tokens", "divide by loss tokens in the optimizer step, or mean per sequence"
    )

    def validate(self) -> None:
        if not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"distill.jsd_beta={self.jsd_beta} must be in (0, 1)")
        if not 0.0 <= self.mixed_kl_weight <= 1.0:
            raise ValueError(f"distill.mixed_kl_weight={self.mixed_kl_weight} must be in [0, 1]")
        if self.top_k < 1:
            raise ValueError(f"distill.top_k={self.top_k} must be >= 1")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (paper defaults)."""

    lr: float = doc(1e-5, "peak learning rate")
    min_lr: float = doc(1e-6, "learning-rate floor of the cosine decay")
    warmup_steps: int = doc(5, "linear warm-up optimizer steps")
    decay: Literal["cosine", "constant", "linear"] = doc("cosine", "decay after warm-up")
    adam_beta1: float = doc(0.9, "AdamW beta1")
    adam_beta2: float = doc(0.999, "AdamW beta2")
    adam_eps: float = doc(1e-8, "AdamW epsilon")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    clip_grad: float = doc(1.0, "global gradient-norm clip; 0 = off")

    def validate(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(
                f"optim.lr={self.lr} and optim.min_lr={self.min_lr} need 0 <= min <= lr"
            )


@dataclass
class CurriculumConfig:
    """Rollout length cap growing over training."""

    schedule: Literal["none", "linear", "cosine"] = doc("none", "none uses rollout.max_new_tokens")
    length_min: int = doc(100, "L_min: cap at step 0")
    length_max: int = doc(4000, "L_max: final cap")
    warmup_steps: int = doc(100, "S_warm: rollout steps to reach L_max")

    def validate(self) -> None:
        if self.schedule != "none" and not 0 < self.length_min <= self.length_max:
            raise ValueError(
                f"curriculum.length_min={self.length_min} and length_max={self.length_max} "
                "need 0 < min <= max"
            )


@dataclass
class DataConfig:
    """Prompt data and tokenizer."""

    train_prompts: str | None = doc(
        None, "JSONL of prompts (schema: megatron_opdlm/data/bundled/README.md)"
    )
    eval_prompts: str | None = doc(None, "held-out JSONL prompts for evaluation")
    eval_limit: int = doc(0, "held-out prompts used per evaluation (the first N); 0 = all")
    tokenizer: str | None = doc(None, "HF tokenizer directory or SentencePiece model file")
    chat_template: bool = doc(True, "wrap prompts in the tokenizer's chat template")
    chat_template_kwargs: dict[str, Any] = doc(
        {},
        "variables for the chat template, a mapping (e.g. {enable_thinking: false} for Qwen3); "
        "one key on the command line: data.chat_template_kwargs.enable_thinking=false",
    )
    max_prompt_length: int = doc(256, "prompts longer than this (tokens) are refused")

    def validate(self) -> None:
        self.chat_template_kwargs = check_template_kwargs(
            self.chat_template_kwargs, "data.chat_template_kwargs"
        )
        if self.chat_template_kwargs and not self.chat_template:
            raise ValueError(
                f"data.chat_template_kwargs={self.chat_template_kwargs} is set but "
                "data.chat_template=false, so no template would read them; drop one of the two"
            )
        if self.max_prompt_length < 1:
            raise ValueError(f"data.max_prompt_length={self.max_prompt_length} must be >= 1")
        if self.eval_limit < 0:
            raise ValueError(f"data.eval_limit={self.eval_limit} must be >= 0 (0 = all)")


@dataclass
class TrainConfig:
    """The training loop."""

    rollout_steps: int = doc(10, "rollout steps (each: rollout batch -> several optimizer steps)")
    prompts_per_rollout: int = doc(8, "prompts rolled out per step, over all DP ranks (paper: 128)")
    global_batch_size: int = doc(8, "sequences per optimizer step over all DP ranks (paper: 8)")
    micro_batch_size: int = doc(1, "sequences per forward/backward on one rank")
    seed: int = doc(1234, "base seed (rank offsets are derived)")
    log_interval: int = doc(1, "optimizer steps between console/TensorBoard logs")
    eval_interval: int = doc(0, "rollout steps between held-out KL evaluations; 0 = off")
    run_dir: str = doc("runs/default", "where logs, TensorBoard and the resolved config go")
    tensorboard: bool = doc(True, "write TensorBoard scalars under run_dir/tensorboard")
    nan_policy: Literal["stop", "skip"] = doc("stop", "non-finite loss/grad/teacher: stop or skip")
    deadline_minutes: float = doc(0.0, "save and exit after this wall time; 0 = no deadline")
    preflight: bool = doc(
        True,
        "plan memory before building models and stop if the layout will not fit "
        "(docs/planning.md); runs on GPUs, or on a CPU when preflight_gpu is set",
    )
    preflight_gpu: str | None = doc(
        None, "GPU to plan against (a planner name, e.g. h100-80g); None = this machine's GPU"
    )

    def validate(self) -> None:
        for name in (
            "rollout_steps",
            "prompts_per_rollout",
            "global_batch_size",
            "micro_batch_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 1")


@dataclass
class CheckpointConfig:
    """Where weights come from and go."""

    teacher: str | None = doc(None, "Megatron checkpoint of the AR teacher (from the converter)")
    student_init: str | None = doc(None, "student initialisation; None = the teacher checkpoint")
    save_dir: str | None = doc(None, "directory of training checkpoints (iter_XXXXXXX + latest)")
    load: str | None = doc(None, "resume from this checkpoint directory")
    save_interval: int = doc(0, "rollout steps between checkpoints; 0 = only at the end")
    keep_last: int = doc(2, "checkpoints kept (older ones deleted after a newer one is complete)")
    save_interval_minutes: float = doc(
        0.0, "also save when this much wall time passed since the last save; 0 = off"
    )
    optimizer_format: str = doc(
        "dp_reshardable",
        "distributed-optimizer checkpoint format: dp_reshardable (each rank writes its shard, "
        "loads at another DP size) or fully_reshardable (gathered at save, loads at any layout)",
    )
    async_save: bool = doc(False, "write routine checkpoints in the background (megatron-core)")

    def validate(self) -> None:
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last={self.keep_last} must be >= 1")
        if self.save_interval_minutes < 0:
            raise ValueError(
                f"checkpoint.save_interval_minutes={self.save_interval_minutes} must be >= 0"
            )
        formats = ("dp_reshardable", "fully_reshardable")
        if self.optimizer_format not in formats:
            raise ValueError(
                f"checkpoint.optimizer_format={self.optimizer_format!r} must be one of {formats}"
            )


@dataclass
class JobConfig:
    """A whole OPDLM run."""

    model: ModelConfig = section(ModelConfig, "architecture of teacher and student")
    diffusion: DiffusionConfig = section(DiffusionConfig, "student block diffusion")
    parallel: ParallelConfig = section(ParallelConfig, "parallel layout")
    precision: PrecisionConfig = section(PrecisionConfig, "numerics and layer implementation")
    rollout: RolloutConfig = section(RolloutConfig, "block-diffusion sampler")
    distill: DistillConfig = section(DistillConfig, "loss")
    optim: OptimConfig = section(OptimConfig, "optimizer")
    curriculum: CurriculumConfig = section(CurriculumConfig, "rollout length curriculum")
    data: DataConfig = section(DataConfig, "prompts and tokenizer")
    train: TrainConfig = section(TrainConfig, "training loop")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "checkpoints")

    def validate(self, world_size: int | None = None) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        validate_layout(self.model, self.parallel, world_size)
        block = self.diffusion.block_size
        caps = {"rollout.max_new_tokens": self.rollout.max_new_tokens}
        if self.curriculum.schedule != "none":
            caps.update({"curriculum.length_min": self.curriculum.length_min,
                         "curriculum.length_max": self.curriculum.length_max})  # fmt: skip
        for name, cap in caps.items():
            if cap % block:
                raise ValueError(
                    f"{name}={cap} is not a multiple of diffusion.block_size={block}: "
                    "responses are decoded in whole blocks"
                )
        if self.rollout.steps_per_block > block:
            raise ValueError(
                f"rollout.steps_per_block={self.rollout.steps_per_block} exceeds "
                f"diffusion.block_size={block}: each round must unmask at least one token"
            )
        if self.train.global_batch_size % self.train.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.train.micro_batch_size}"
            )


def validate_layout(model: ModelConfig, parallel: ParallelConfig, world_size: int | None) -> None:
    """Checks that involve both the architecture and the parallel layout."""
    tp, pp = parallel.tp, parallel.pp
    if model.num_attention_heads % tp:
        raise ValueError(
            f"model.num_attention_heads={model.num_attention_heads} is not divisible by "
            f"parallel.tp={tp}"
        )
    if model.num_query_groups % tp:
        raise ValueError(
            f"model.num_query_groups={model.num_query_groups} (kv heads) is not divisible by "
            f"parallel.tp={tp}"
        )
    stages = pp * (parallel.vpp or 1)
    if model.num_layers % stages:
        raise ValueError(
            f"model.num_layers={model.num_layers} is not divisible by parallel.pp={pp} x "
            f"parallel.vpp={parallel.vpp or 1} = {stages} pipeline stages"
        )
    if model.padded_vocab_size % tp:
        raise ValueError(
            f"padded vocabulary {model.padded_vocab_size} (model.vocab_pad_multiple="
            f"{model.vocab_pad_multiple}) is not divisible by parallel.tp={tp}; "
            f"use a vocab_pad_multiple that is a multiple of {tp}"
        )
    if model.ffn_hidden_size % tp:
        raise ValueError(
            f"model.ffn_hidden_size={model.ffn_hidden_size} is not divisible by parallel.tp={tp}"
        )
    if world_size is not None and world_size % (tp * pp):
        raise ValueError(
            f"world size {world_size} is not divisible by parallel.tp={tp} x parallel.pp={pp}"
        )


def load_config(path: str | None = None, overrides: list[str] | None = None) -> JobConfig:
    return config_base.load(JobConfig, path, overrides)


def config_help() -> str:
    return config_base.help_text(JobConfig)
