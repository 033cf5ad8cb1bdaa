"""The attention core of the layer spec: FlexAttention over block-diffusion mask predicates.

`FlexCoreAttention` fills megatron-core's `self_attention.submodules.core_attention` slot, between
the QKV and output linears (Transformer Engine's or the local ones, so TE keeps its FP8 GEMMs).
Megatron applies RoPE (at the explicit position ids) and q/k layernorm before the call and splits
heads over tensor-parallel ranks; the mask is head-independent, so TP and sequence parallelism
(gathered before the QKV linear) need nothing here.

The `attention_mask` argument carries the column descriptor of `models.mask_functions`
([b, 3, K] int32, O(S)); the block mask is built from it (`models.block_masks`) once per forward
and shared by the layers (cached on the tensor's storage, shape and version, with a strong
reference so the address cannot be reused; recompute re-runs on a detached alias of the same
storage and hits the cache). A dense [b, 1, s_q, K] bool mask or None (causal / no mask) is also
accepted, for callers that were not converted. No [S, S] tensor is made on the GPU path.

Paths:
- CUDA: `torch.compile(flex_attention)`, forward and backward.
- CPU without grad (rollout, teacher, evaluation): flex forward, eager by default (compiled with
  `compile=True`, after `prepare_cpu_compile`).
- CPU with grad (training): torch has no CPU flex backward, so scaled_dot_product_attention on the
  dense mask evaluated from the same predicate.

Backends (`precision.attention_backend`): flex (this core), te (TEDotProductAttention), local
(megatron's DotProductAttention); auto = flex on a GPU, else the layer implementation's own core.
"""

from __future__ import annotations

import collections
import functools

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from torch.nn.attention.flex_attention import flex_attention

from megatron_opdlm.models import block_masks
from megatron_opdlm.models import mask_functions as mf

ATTENTION_BACKENDS = ("auto", "flex", "te", "local")


def resolve_attention_backend(backend: str, transformer_impl: str) -> str:
    """'flex' | 'te' | 'local' for a resolved layer implementation (transformer_engine | local)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"precision.attention_backend={backend!r} must be one of {ATTENTION_BACKENDS}"
        )
    if backend == "auto":
        if torch.cuda.is_available():
            return "flex"
        return "te" if transformer_impl == "transformer_engine" else "local"
    if backend == "te" and transformer_impl != "transformer_engine":
        raise ValueError(
            "precision.attention_backend=te needs Transformer Engine layers "
            f"(precision.transformer_impl resolved to {transformer_impl}); use flex or local"
        )
    return backend


def mask_format_for(precision) -> str:
    """The `models.masks` format a job's models take: 'columns' for flex, else 'dense'."""
    from megatron_opdlm.models.specs import resolve_transformer_impl

    backend = resolve_attention_backend(
        precision.attention_backend, resolve_transformer_impl(precision)
    )
    return "columns" if backend == "flex" else "dense"


def use_attention_backend(layer_spec, backend: str):
    """Put the backend's core attention into a layer spec (in place; returns the spec). 'te' and
    'local' keep the spec's own core (TEDotProductAttention / DotProductAttention)."""
    if backend == "flex":
        layer_spec.submodules.self_attention.submodules.core_attention = FlexCoreAttention
    elif backend == "local":
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        layer_spec.submodules.self_attention.submodules.core_attention = DotProductAttention
    return layer_spec


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=None)


def prepare_cpu_compile() -> None:
    """Two torch 2.13 CPU-inductor workarounds needed before compiling flex_attention on a CPU
    (shared/notes/flex-core-probe.md, pitfalls 1 and 2). Idempotent; no effect on CUDA paths.

    1. The CPU flex template inserts the *current* `torch.full` into the mask graph; cpu_compat's
       wrapper of it has no inductor lowering: alias each wrapper to the original's lowering.
    2. `CppFlexAttentionTemplate.modification` renames size variables with `str.replace`, so
       `ks1` also rewrites `ks18` (CppCompileError): rename whole words only.
    """
    import importlib
    import inspect
    import re
    import textwrap

    # the lowering table first: importing the template module alone is a circular import
    lowerings = importlib.import_module("torch._inductor.lowering").lowerings
    template = importlib.import_module("torch._inductor.codegen.cpp_flex_attention_template")

    for name in ("full", "zeros", "ones", "empty", "full_like", "zeros_like", "ones_like",
                 "empty_like", "arange"):  # fmt: skip
        wrapper = getattr(torch, name)
        original = getattr(wrapper, "__wrapped__", None)
        if original is not None and original in lowerings and wrapper not in lowerings:
            lowerings[wrapper] = lowerings[original]
    cls = template.CppFlexAttentionTemplate
    if getattr(cls.modification, "_whole_word_rename", False):
        return
    source = textwrap.dedent(inspect.getsource(cls.modification))
    if source.count("output_code = output_code.replace(") != 2:
        raise RuntimeError("torch's CPU flex template changed: re-check prepare_cpu_compile")
    source = source.replace(
        "output_code = output_code.replace(", "output_code = _rename(output_code, "
    )
    namespace = dict(vars(template))
    namespace["_rename"] = lambda text, old, new: re.sub(rf"\b{re.escape(old)}\b", new, text)
    exec(compile(source, template.__file__, "exec"), namespace)  # noqa: S102
    namespace["modification"]._whole_word_rename = True
    cls.modification = namespace["modification"]


class _ForwardMasks:
    """Block masks (or dense masks) per attention_mask tensor, shared by the layers of a forward.

    Keyed on (storage address, shape, version, queries, kind); keeps the tensor alive so the key
    cannot be reused by another tensor while the entry exists."""

    def __init__(self, capacity: int = 8):
        self.entries: collections.OrderedDict = collections.OrderedDict()
        self.capacity = capacity
        self.builds = 0

    def get(self, mask: torch.Tensor, num_queries: int, kind: str, build):
        key = (mask.untyped_storage().data_ptr(), mask.storage_offset(), tuple(mask.shape),
               mask._version, num_queries, kind, str(mask.device))  # fmt: skip
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key][1]
        value = build()
        self.builds += 1
        self.entries[key] = (mask, value)
        if len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return value


FORWARD_MASKS = _ForwardMasks()


def _columns_from(attention_mask, attn_mask_type, batch: int, num_queries: int, num_keys: int,
                  device) -> torch.Tensor | None:  # fmt: skip
    """A descriptor for None masks (causal, bottom-right aligned, or no mask); None = dense."""
    if attention_mask is not None:
        return attention_mask if mf.is_descriptor(attention_mask) else None
    if attn_mask_type in (AttnMaskType.causal, AttnMaskType.causal_bottom_right):
        block = torch.arange(num_keys, device=device)[None]  # block size 1: causal
    else:
        block = torch.zeros(1, num_keys, dtype=torch.long, device=device)  # one block: all
    noisy = torch.zeros_like(block, dtype=torch.bool)
    return mf.descriptor(block, noisy, None, batch=batch)


def _dense_block_mask(dense: torch.Tensor, num_keys: int):
    """A BlockMask indexing a dense [b, 1, s_q, K] mask (True = masked): O(S^2), for callers
    that still pass dense masks."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, _, s_q, _ = dense.shape

    def mask_mod(batch, h, q_idx, kv_idx):
        return ~dense[batch, 0, q_idx, kv_idx]

    return create_block_mask(mask_mod, b, None, s_q, num_keys, device=dense.device)


def attention(
    query: torch.Tensor,  # [b, np, sq, hn]
    key: torch.Tensor,  # [b, ng, sk, hn]
    value: torch.Tensor,  # [b, ng, sk, hn]
    attention_mask,
    attn_mask_type=AttnMaskType.arbitrary,
    scale: float | None = None,
    compile: bool | None = None,
) -> torch.Tensor:  # [b, np, sq, hn]
    """Masked attention by the predicates: flex where it can run, SDPA on the dense mask for
    CPU training. `compile`: None = compile on CUDA only."""
    b, num_heads, sq, _ = query.shape
    sk = key.shape[2]
    gqa = num_heads != key.shape[1]
    cpu_grad = (
        query.device.type == "cpu"
        and torch.is_grad_enabled()
        and (query.requires_grad or key.requires_grad or value.requires_grad)
    )
    columns = _columns_from(attention_mask, attn_mask_type, b, sq, sk, query.device)
    if cpu_grad:  # no CPU flex backward in torch 2.13: the same predicate, dense, through SDPA
        if columns is not None:
            keep = FORWARD_MASKS.get(
                columns, sq, "dense", lambda: mf.dense_allowed(columns, sq)[:, None]
            )  # [b, 1, sq, sk]
        else:
            keep = ~attention_mask
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=keep, scale=scale, enable_gqa=gqa
        )
    if columns is None:
        block_mask = FORWARD_MASKS.get(
            attention_mask, sq, "flex-dense", lambda: _dense_block_mask(attention_mask, sk)
        )
        q_pad, k_pad = sq, sk
    else:
        block_mask = FORWARD_MASKS.get(
            columns, sq, "flex", lambda: block_masks.build_block_mask(columns, sq)
        )
        q_pad, k_pad = block_masks.padded_lengths(sq, sk)
    if compile is None:
        compile = query.device.type == "cuda"
    kernel = _compiled_flex() if compile else flex_attention
    if q_pad != sq:
        query = F.pad(query, (0, 0, 0, q_pad - sq))  # padded queries: outputs dropped below
    if k_pad != sk:
        key, value = F.pad(key, (0, 0, 0, k_pad - sk)), F.pad(value, (0, 0, 0, k_pad - sk))
    out = kernel(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    return out[:, :, :sq]


class FlexCoreAttention(MegatronModule):
    """megatron-core core attention (the DotProductAttention call contract) on FlexAttention.

    Vanilla softmax only: no attention dropout, bias, sliding window, softmax offset, qk-clip,
    context parallelism or packed (THD) sequences; each is refused at construction or call.
    """

    takes_mask_columns = True  # producers send column descriptors (`models.masks.mask_format`)

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        compile: bool | None = None,
    ):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"attention_dropout={dropout}: the flex core has no dropout; use 0")
        if getattr(config, "context_parallel_size", 1) != 1:
            raise ValueError("the flex core does not support context parallelism (cp must be 1)")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("the flex core does not support sliding-window attention")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(
                f"the flex core supports vanilla softmax only, not {config.softmax_type}"
            )
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.softmax_scale = softmax_scale  # None = 1/sqrt(head dim), as DotProductAttention
        self.compile = compile
        self.softmax_offset = None  # read by megatron's inference paths
        self.current_max_attn_logits = None

    def forward(
        self,
        query: torch.Tensor,  # [sq, b, np, hn]
        key: torch.Tensor,  # [sk, b, ng, hn]
        value: torch.Tensor,  # [sk, b, ng, hn]
        attention_mask,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:  # [sq, b, np * hn]
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("the flex core takes no attention_bias or packed_seq_params")
        sq, b, num_heads, head_dim = query.shape
        # with a KV-cache offset megatron passes no_mask even with a mask: the mask decides
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if attention_mask is not None:
            mask_type = AttnMaskType.arbitrary
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        out = attention(q, k, v, attention_mask, mask_type, self.softmax_scale, self.compile)
        return out.permute(2, 0, 1, 3).reshape(sq, b, num_heads * head_dim)
