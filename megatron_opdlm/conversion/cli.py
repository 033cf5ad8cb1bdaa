"""Command lines of tools/convert_hf_to_megatron.py and tools/convert_megatron_to_hf.py.

Exit codes: 0 success, 1 --verify found the models differ past tolerance, 2 bad input (a
ValueError: unsupported architecture, missing/extra tensors, shapes, layout, output exists).
"""

from __future__ import annotations

import json

import torch

from megatron_opdlm.cli_errors import ArgumentParser, report_usage_error


def _fail(exc: ValueError) -> int:
    return report_usage_error(exc)


def _print_metrics(metrics: dict) -> None:
    rows = [
        ("max |logit diff|", f"{metrics['max_abs_logit_diff']:.3e}"),
        ("mean KL(hf || megatron)",
         f"{metrics['mean_kl']:.3e} (tolerance {metrics['kl_tolerance']:g})"),
        ("max KL", f"{metrics['max_kl']:.3e}"),
        ("argmax agreement", f"{metrics['argmax_agreement']:.4f} (must be 1)"),
        ("result", "PASS" if metrics["passed"] else "FAIL"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def hf_to_megatron_main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        description="Convert a Hugging Face model directory (Llama 3.x, Qwen2/2.5, Qwen3, Mistral) "
        "into a Megatron distributed checkpoint loadable at any TP/PP/VPP."
    )
    parser.add_argument("--hf-dir", required=True, help="HF directory: config.json, safetensors")
    parser.add_argument(
        "--out", required=True, help="checkpoint directory to create (must not exist)"
    )
    parser.add_argument("--tp", type=int, default=1, help="target tensor-parallel size (checked)")
    parser.add_argument("--pp", type=int, default=1, help="target pipeline-parallel size (checked)")
    parser.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    parser.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        default=None,
        help="on-disk dtype (default: the HF tensors' dtype)",
    )
    parser.add_argument(
        "--vocab-pad-multiple",
        type=int,
        default=None,
        help="pad the vocabulary to a multiple of this (default lcm(128, tp))",
    )
    parser.add_argument(
        "--mask-token-id",
        type=int,
        default=None,
        help="an unused vocabulary row (e.g. one of Qwen3's padded rows) as the student's mask "
        "token (default: add a row after the vocabulary)",
    )
    parser.add_argument(
        "--max-chunk-mb",
        type=float,
        default=128,
        help="largest chunk held in memory and stored (MiB)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check every stored tensor against the HF rows, streaming (memory: one chunk), "
        "then compare logits with transformers if the model is small enough",
    )
    parser.add_argument(
        "--verify-logits-max-gb", type=float, default=8.0,
        help="largest fp32 model size (GiB) for the logits comparison of --verify (it loads "
        "both models whole); larger models get the streaming tensor check only",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)  # fmt: skip
    from megatron_opdlm.conversion.hf_to_megatron import convert_hf_to_megatron

    try:
        result = convert_hf_to_megatron(
            args.hf_dir, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp, dtype=args.dtype,
            max_chunk_mb=args.max_chunk_mb, vocab_pad_multiple=args.vocab_pad_multiple,
            progress=not args.no_progress, mask_token_id=args.mask_token_id,
        )  # fmt: skip
    except ValueError as exc:
        return _fail(exc)
    mib = result["bytes"] / 2**20
    print(f"wrote {result['out']} ({mib:.1f} MiB, {mib / max(result['seconds'], 1e-9):.0f} MiB/s)")
    if not args.verify:
        return 0
    from megatron_opdlm.conversion.verify import (
        model_fp32_gib,
        verify_conversion,
        verify_tensors_streaming,
    )

    tensors = verify_tensors_streaming(args.hf_dir, args.out)
    print(f"tensor check (streaming, largest chunk {tensors['largest_chunk_elements']} elements): "
          f"{tensors['elements']} elements, {'PASS' if tensors['passed'] else 'FAIL'}")  # fmt: skip
    for line in tensors["mismatches"]:
        print(f"  mismatch: {line}")
    size = model_fp32_gib(args.out)
    if size > args.verify_logits_max_gb:
        limit = args.verify_logits_max_gb
        print(f"logits check skipped: the model is {size:.1f} GiB in fp32 (> "
              f"--verify-logits-max-gb {limit:g}; it loads both models whole)")  # fmt: skip
        return 0 if tensors["passed"] else 1
    with torch.no_grad():  # scoped: main() is also called in-process (tests, the demo)
        metrics = verify_conversion(args.hf_dir, args.out)
    _print_metrics(metrics)
    return 0 if metrics["passed"] and tensors["passed"] else 1


def megatron_to_hf_main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        description="Export a Megatron checkpoint (from the converter or training, any TP/PP) "
        "to Hugging Face safetensors; a student's config records its diffusion settings."
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint dir (or trainer save dir)")
    parser.add_argument("--out", required=True, help="HF directory to create (must not exist)")
    parser.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        default=None,
        help="output dtype (default: as stored)",
    )
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--remasking",
        choices=["static", "dynamic"],
        default=None,
        help="a student's default decoding in config.json (default static, 1 token per round)",
    )
    parser.add_argument("--threshold", type=float, default=None, help="default dynamic threshold")
    parser.add_argument("--steps-per-block", type=int, default=None, help="default rounds/block")
    args = parser.parse_args(argv)  # fmt: skip
    from megatron_opdlm.conversion.megatron_to_hf import convert_megatron_to_hf

    decoding = {
        key: value
        for key, value in (("remasking", args.remasking), ("threshold", args.threshold),
                           ("steps_per_block", args.steps_per_block))
        if value is not None
    }  # fmt: skip

    try:
        result = convert_megatron_to_hf(
            args.ckpt, args.out, dtype=args.dtype, max_shard_gb=args.max_shard_gb,
            progress=not args.no_progress, decoding=decoding,
        )  # fmt: skip
    except ValueError as exc:
        return _fail(exc)
    print(json.dumps({"out": str(result["out"]), "MiB": round(result["bytes"] / 2**20, 1)}))
    if result["dlm"]:
        print(
            f"load it: AutoModelForCausalLM.from_pretrained('{result['out']}', "
            "trust_remote_code=True).generate(...) decodes block-wise (usage in its README.md)"
        )
    return 0
