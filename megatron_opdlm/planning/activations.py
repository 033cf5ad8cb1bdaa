"""Activation bytes of one transformer layer, from what the implementations save for backward.

Two implementations, each term named after the tensor it stands for:
- `local` (Megatron's local spec with our RMSNorm; what runs on CPUs and in the CPU tests): the
  terms were read off `torch.autograd.graph.saved_tensors_hooks` on tiny configs and are checked
  against them (tests/distributed/test_planning_dist.py). RMSNorm saves its fp32 input copy, the
  fp32 normalised value and the weighted output; the unfused attention saves q and k, v expanded
  to all query heads (GQA repeat), the fp32 softmax and (bf16/fp16) its low-precision copy, and
  the context; SwiGLU saves fc1's output, silu(a), an intermediate of the same width and the
  product.
- `transformer_engine` (GPU): LayerNormLinear saves its input, the normalised output and rstd;
  fused (flash / FlexAttention) core attention saves q, k, v at their GQA sizes, the output and the
  fp32 log-sum-exp; the dense/unfused path (TE's only path for an arbitrary mask) also keeps the
  [b, a/tp, s, s] probabilities (fp32 softmax + low-precision copy, as measured for local);
  SwiGLU saves fc1's output and the product. FP8 copies of GEMM inputs are not subtracted
  (conservative by up to ~30% of the linear inputs).

Sequence parallelism divides the terms that live outside the TP regions (norm inputs/outputs)
by TP. Recompute "selective" recomputes core attention (drops the s^2 terms and the expanded
k/v); "full" keeps each layer's input only and recomputes one layer at a time in backward.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerShape:
    seq: int  # s, tokens of the row
    batch: int  # b, rows per micro-batch
    hidden: int  # h
    heads: int  # a, query heads (all TP ranks)
    groups: int  # g, key/value heads
    head_dim: int  # d
    ffn: int  # f, per gate/up projection
    tp: int
    sequence_parallel: bool
    elem: int  # bytes per activation element (2 bf16/fp16, 4 fp32)

    @property
    def outside_tp(self) -> int:
        """Divisor of the terms outside TP regions (norms, residuals)."""
        return self.tp if self.sequence_parallel else 1


def layer_saved_bytes(shape: LayerShape, impl: str, attention: str, recompute: str) -> int:
    """Bytes one layer keeps for backward after its forward, for one micro-batch."""
    full = _layer_saved_full(shape, impl, attention, recompute)
    if recompute == "full":
        x = shape
        # the checkpointed layer input (the chunk's rope table: `chunk_saved_bytes`)
        return x.elem * x.seq * x.batch * x.hidden // x.outside_tp
    return full


def layer_working_bytes(shape: LayerShape, impl: str, attention: str, recompute: str) -> int:
    """Extra bytes while one layer runs backward: its recomputed activations (full recompute)
    or recomputed core attention (selective), plus the activation gradients in flight."""
    x = shape
    grads = 2 * x.elem * x.seq * x.batch * (x.hidden + 2 * x.ffn // x.tp)
    if recompute == "full":
        return _layer_saved_full(x, impl, attention, "none") + grads
    if recompute == "selective":
        return _attention_core_bytes(x, impl, attention) + grads
    return grads


def _attention_core_bytes(x: LayerShape, impl: str, attention: str) -> int:
    """What core attention alone saves (the part selective recompute drops)."""
    sb, heads = x.seq * x.batch, x.heads // x.tp
    if impl == "local":
        # q, k and v expanded to all query heads
        qkv = 3 * x.elem * sb * heads * x.head_dim
        probs = (4 + (x.elem if x.elem != 4 else 0)) * x.batch * heads * x.seq * x.seq
        return qkv + probs
    qkv = x.elem * sb * (x.heads + 2 * x.groups) // x.tp * x.head_dim
    if attention == "dense":
        return qkv + (4 + x.elem) * x.batch * heads * x.seq * x.seq
    return qkv + 4 * x.batch * heads * x.seq  # flash / flex: log-sum-exp


def _layer_saved_full(x: LayerShape, impl: str, attention: str, recompute: str) -> int:
    sb, sbh = x.seq * x.batch, x.seq * x.batch * x.hidden
    heads = x.heads // x.tp
    context = x.elem * sb * heads * x.head_dim  # attention output = proj input
    if impl == "local":
        norms = 2 * ((4 + 4 + x.elem) * sbh + 4 * sb) // x.outside_tp
        rope = 4 * x.elem * x.seq * x.head_dim  # cos/sin for q and k
        mlp = 5 * x.elem * sb * x.ffn // x.tp
    else:
        norms = 2 * (2 * x.elem * sbh + 4 * sb) // x.outside_tp
        rope = 0
        mlp = 3 * x.elem * sb * x.ffn // x.tp
    core = _attention_core_bytes(x, impl, attention)
    if recompute == "selective":
        core = 0  # recomputed from the saved qkv-projection input in backward
        context += x.elem * sb * (x.heads + 2 * x.groups) // x.tp * x.head_dim
    return norms + rope + context + core + mlp


def chunk_saved_bytes(shape: LayerShape, recompute: str) -> int:
    """Per model chunk: with full recompute every checkpointed layer keeps the chunk's fp32
    rotary table [s, 1, 1, d] (one tensor per chunk forward)."""
    return 4 * shape.seq * shape.head_dim if recompute == "full" else 0


def embedding_saved_bytes(seq: int, batch: int) -> int:
    """Token ids kept by the embedding lookup (int64)."""
    return 8 * seq * batch


def final_norm_and_head_bytes(
    x: LayerShape, impl: str, projected_rows: int, projects_rows: bool
) -> int:
    """Last stage: final norm's saved tensors and the output layer's input."""
    sbh = x.seq * x.batch * x.hidden
    if impl == "local":
        norm = ((4 + 4) * sbh + 4 * x.seq * x.batch) // x.outside_tp
    else:
        norm = (2 * x.elem * sbh + 4 * x.seq * x.batch) // x.outside_tp
    rows = projected_rows if projects_rows else x.seq
    index = 8 * projected_rows if projects_rows else 0  # the int64 columns index_select keeps
    return norm + x.elem * rows * x.batch * x.hidden + index
