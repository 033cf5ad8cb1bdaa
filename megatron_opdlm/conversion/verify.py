"""Parity of a converted checkpoint with transformers: logits, KL, argmax, greedy generation.

Two checks back `--verify`: `verify_tensors_streaming` compares every stored tensor with its HF
rows one stored chunk at a time (memory: a chunk, any model size); `verify_conversion` runs both
models whole in fp32 in one process (logits parity, small models only: the CLI skips it above
--verify-logits-max-gb).

`megatron_logits` runs the model chunks of any TP/PP/VPP layout through Megatron's forward-only
pipeline schedule and gathers the vocab-parallel logits on the last stage. Comparisons use only
the first `vocab_size` columns: padded rows of the Megatron vocabulary are not tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_opdlm.runtime.logging import get_logger

log = get_logger(__name__)
# fp32 on both sides with identical weights: differences are summation order only (~1e-6 in
# logits), far below a KL of 1e-6 and below any argmax gap that is not an exact tie.
DEFAULT_KL_TOLERANCE = 1e-6


def megatron_logits(chunks, input_ids: torch.Tensor) -> torch.Tensor | None:
    """input_ids [b, s] -> full padded-vocab logits [b, s, V] (fp32) on the last pipeline stage
    (every TP rank), None on other stages. Causal (teacher) attention. Each sequence is one
    micro-batch (interleaved pipelines need at least `pp` micro-batches)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_opdlm.models.masks import causal_mask

    b, s = input_ids.shape
    device = next(chunks[0].parameters()).device
    tokens = input_ids.to(device)
    positions = torch.arange(s, device=device).unsqueeze(0)  # [1, s]
    # explicit: the teacher's mask type on Transformer Engine needs one (models.specs)
    causal = causal_mask(torch.ones(1, s, dtype=torch.bool, device=device))  # [1, 1, s, s]

    def forward_step(data_iterator, model):
        row = next(data_iterator)
        output = model(tokens[row : row + 1], positions, causal)  # [1, s, V/tp] on the last stage

        def collect(output_tensor, non_loss_data=True):
            return gather_from_tensor_model_parallel_region(output_tensor).float()  # [1, s, V]

        return output, collect

    iterators = [iter(range(b)) for _ in chunks]
    with torch.no_grad():
        collected = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks,
            num_microbatches=b,
            seq_length=s,
            micro_batch_size=1,
            forward_only=True,
            collect_non_loss_data=True,
        )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat(list(collected), 0)  # [b, s, V]


def compare_logits(reference: torch.Tensor, test: torch.Tensor, vocab_size: int) -> dict:
    """Metrics of `test` against `reference` ([b, s, >= vocab_size]) over real tokens."""
    ref = reference[..., :vocab_size].double()  # [b, s, v]
    out = test[..., :vocab_size].double()
    ref_logp, out_logp = ref.log_softmax(-1), out.log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - out_logp)).sum(-1)  # [b, s] KL(p_ref || p_test)
    return {
        "max_abs_logit_diff": (ref - out).abs().max().item(),
        "mean_kl": kl.mean().item(),
        "max_kl": kl.max().item(),
        "argmax_agreement": (ref.argmax(-1) == out.argmax(-1)).double().mean().item(),
    }


def greedy_generate(chunks, input_ids: torch.Tensor, new_tokens: int, vocab_size: int):
    """[b, s] -> [b, s + new_tokens] greedy continuation (one process, full recompute)."""
    tokens = input_ids
    for _ in range(new_tokens):
        logits = megatron_logits(chunks, tokens)  # [b, s, V]
        next_ids = logits[:, -1, :vocab_size].argmax(-1, keepdim=True)  # [b, 1]
        tokens = torch.cat([tokens, next_ids.to(tokens.device)], 1)
    return tokens


def load_hf_model(hf_dir: str | Path, dtype: torch.dtype | None = None):
    """transformers model in fp32 with eager attention; weights rounded through `dtype` first
    when the checkpoint was converted to a lower precision (so both sides hold equal weights)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=torch.float32, attn_implementation="eager"
    )
    if dtype is not None and dtype != torch.float32:
        model = model.to(dtype).float()
    return model.eval()


def default_prompts(hf_dir: str | Path, vocab_size: int, count: int = 3, length: int = 24):
    """Token ids [count, length]: chat prompts through the tokenizer when there is one, else
    seeded random ids."""
    texts = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "Explain why the sky is blue in one sentence.",
    ][:count]
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(hf_dir))
        ids = [tok(t)["input_ids"][:length] for t in texts]
        width = min(len(i) for i in ids)
        if width >= 4:
            return torch.tensor([i[:width] for i in ids])
    except (OSError, ValueError, TypeError):
        pass
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (count, length), generator=gen)


def verify_conversion(hf_dir, ckpt_dir, kl_tolerance: float = DEFAULT_KL_TOLERANCE) -> dict:
    """Load both models (TP=PP=1, this process), run prompts, return metrics and `passed`."""
    from megatron_opdlm.checkpoint_layout import load_model_checkpoint, read_model_meta
    from megatron_opdlm.config import JobConfig, ParallelConfig
    from megatron_opdlm.models.builder import build_teacher
    from megatron_opdlm.runtime import distributed

    model_cfg, _ = read_model_meta(ckpt_dir)
    started = not torch.distributed.is_initialized()
    distributed.initialize(ParallelConfig(), seed=0)
    try:
        job = JobConfig(model=model_cfg)
        chunks = build_teacher(job)
        load_model_checkpoint(chunks, ckpt_dir)
        stored = _stored_dtype(ckpt_dir)
        prompts = default_prompts(hf_dir, model_cfg.vocab_size)
        hf_model = load_hf_model(hf_dir, stored)
        with torch.no_grad():
            reference = hf_model(prompts).logits  # [b, s, v]
        metrics = compare_logits(reference, megatron_logits(chunks, prompts), model_cfg.vocab_size)
    finally:
        if started:
            distributed.shutdown()
    metrics["passed"] = metrics["mean_kl"] <= kl_tolerance and metrics["argmax_agreement"] == 1.0
    metrics["kl_tolerance"] = kl_tolerance
    return metrics


def _stored_dtype(ckpt_dir) -> torch.dtype:
    from megatron.core import dist_checkpointing

    from megatron_opdlm.checkpoint_layout import MODEL_DIR, resolve_checkpoint_dir

    meta = dist_checkpointing.load_tensors_metadata(
        str(resolve_checkpoint_dir(ckpt_dir) / MODEL_DIR)
    )
    return meta["embedding.word_embeddings.weight"].dtype


def verify_tensors_streaming(hf_dir, ckpt_dir) -> dict:
    """Every stored tensor of the checkpoint against the HF safetensors rows it came from.

    Reads one stored chunk at a time (the converter splits tensors by layer and rows, at most
    --max-chunk-mb) and the HF rows it covers (pread), so memory is bounded by a chunk, not a
    model: this runs at 70B on a CPU node. Exact comparison after casting the HF rows to the
    stored dtype (what the converter does); padding and the added mask row are not HF rows.
    Returns {"passed", "mismatches" (first 20), "elements", "largest_chunk_elements"}.
    """
    from megatron_opdlm.checkpoint_layout import MODEL_DIR, read_model_meta, resolve_checkpoint_dir
    from megatron_opdlm.conversion.dist_reader import DistCheckpointReader
    from megatron_opdlm.conversion.families import mappings_for
    from megatron_opdlm.conversion.hf_config import export_vocab_rows
    from megatron_opdlm.conversion.mappings import Dims, overlapping
    from megatron_opdlm.conversion.safetensors_io import SafetensorsReader

    ckpt_dir = resolve_checkpoint_dir(ckpt_dir)
    model_cfg, diffusion_cfg = read_model_meta(ckpt_dir)
    dims = Dims(model_cfg, export_vocab_rows(model_cfg, diffusion_cfg))
    mismatches: list[str] = []
    elements = largest = 0
    with (
        DistCheckpointReader(ckpt_dir / MODEL_DIR) as reader,
        SafetensorsReader(hf_dir) as hf,
    ):
        for mapping in mappings_for(model_cfg):
            segments = mapping.segments(dims)
            for offsets, data in reader.chunks(mapping.megatron):
                largest = max(largest, data.numel())
                if not mapping.layered:  # add a layer axis of one
                    offsets, data = (0, *offsets), data.unsqueeze(0)
                layer0, row0 = offsets[0], offsets[1]
                col0 = offsets[2] if len(offsets) > 2 else 0
                for j in range(data.shape[0]):  # [layers in chunk, rows, (cols)]
                    names = mapping.hf_names(layer0 + j if mapping.layered else None)
                    for seg, lo, hi in overlapping(segments, row0, row0 + data.shape[1]):
                        if seg.source is None:
                            continue
                        name, stored = names[seg.source], data[j, lo - row0 : hi - row0]
                        first = seg.hf_start + lo - seg.start
                        rows = hf.read_rows(name, first, first + (hi - lo))
                        if stored.dim() > 1:
                            rows = rows[:, col0 : col0 + stored.shape[1]]  # [rows, cols of chunk]
                        elements += stored.numel()
                        if not torch.equal(stored, rows.to(stored.dtype)):
                            diff = (stored.double() - rows.double()).abs().max().item()
                            mismatches.append(
                                f"{name} rows [{first}, {first + hi - lo}) vs {mapping.megatron}: "
                                f"max |diff| {diff:.3e}"
                            )
                del data
    return {"passed": not mismatches, "mismatches": mismatches[:20], "elements": elements,
            "largest_chunk_elements": largest}  # fmt: skip


def model_fp32_gib(ckpt_dir) -> float:
    """fp32 size of the checkpoint's model (what the logits check holds twice, HF and Megatron)."""
    from megatron_opdlm.checkpoint_layout import MODEL_DIR, resolve_checkpoint_dir
    from megatron_opdlm.conversion.dist_reader import DistCheckpointReader

    with DistCheckpointReader(resolve_checkpoint_dir(ckpt_dir) / MODEL_DIR) as reader:
        return sum(meta.size.numel() for meta in reader.tensors.values()) * 4 / 2**30
