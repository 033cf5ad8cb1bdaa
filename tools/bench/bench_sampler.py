"""Benchmark the block-diffusion sampler against the AR teacher, in one run (prints a table,
writes JSON).

    python tools/bench/bench_sampler.py                       # SmolLM2-135M, batch 1 and 8
    python tools/bench/bench_sampler.py --ckpt CKPT --hf-dir HF --new-tokens 128 --threads 1

Rows per batch size (greedy; block 4 and token shift unless the student was trained otherwise;
EOS ignored so every run decodes exactly the same number of tokens, as HF's min_new_tokens):
  static        cached, B steps per block (1 token per forward)
  dynamic 0.9   cached, threshold 0.9;   dynamic 0.7: threshold 0.7
  no cache      static without the KV cache (whole sequence every round, same decisions and
                forwards as `static`): about 4 min at batch 1 and 25 min at batch 8 for 256
                tokens on 1 core. --no-cache-tokens N decodes fewer; its per-token cost grows
                with length, so a speed-up measured at a shorter length is an underestimate.
  AR teacher    transformers generate(do_sample=False) with its KV cache, same weights
Without --ckpt the student is SmolLM2-135M-Instruct converted from the bundled GGUF, untrained
(its mask row is the mean embedding): tokens per forward are the untrained figures. The machine
may be shared: the comparisons (ratios) come from the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "Write a short poem about the sea.",
    "Explain photosynthesis to a child.",
    "What is 17 times 23? Show your work.",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "List the planets of the solar system in order from the sun.",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", help="Megatron checkpoint of the student (default: SmolLM2 teacher)")
    p.add_argument("--hf-dir", help="HF directory of the AR teacher (default: SmolLM2)")
    p.add_argument("--work-dir", default="runs/bench/smollm2", help="where SmolLM2 is converted")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument(
        "--no-cache-tokens", type=int, help="tokens for the no-cache row (default: --new-tokens)"
    )
    p.add_argument("--block-size", type=int, help="default: the student's (4 untrained)")
    # 1 thread: on a shared 2-core machine, 2 OpenMP threads make small-M GEMMs (a block of 4
    # tokens) 10-30x slower whenever another process takes a core (measured); 1 is stable
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/bench/bench_sampler.json")
    p.add_argument("--runs", help="comma-separated subset, e.g. 'static,no cache' (default: all)")
    return p.parse_args(argv)


def prepare(args):
    from megatron_opdlm.conversion.hf_to_megatron import convert_hf_to_megatron
    from megatron_opdlm.conversion.smollm2 import materialize_smollm2_hf

    work = Path(args.work_dir)
    hf_dir = Path(args.hf_dir) if args.hf_dir else materialize_smollm2_hf(work / "smollm2_hf")
    ckpt = Path(args.ckpt) if args.ckpt else work / "smollm2_megatron"
    if not args.ckpt and not (ckpt / "opdlm_model.yaml").is_file():
        convert_hf_to_megatron(hf_dir, ckpt)
    return hf_dir, ckpt


def load_student(ckpt):
    from megatron_opdlm.checkpoint_layout import (
        TOKENIZER_DIR,
        load_model_checkpoint,
        read_model_meta,
        resolve_checkpoint_dir,
    )
    from megatron_opdlm.config import DiffusionConfig, JobConfig, ParallelConfig, PrecisionConfig
    from megatron_opdlm.data.tokenizer import load_tokenizer
    from megatron_opdlm.models.builder import build_student
    from megatron_opdlm.models.vocab import init_mask_token_row
    from megatron_opdlm.runtime import distributed

    ckpt = resolve_checkpoint_dir(ckpt)  # a trainer save dir: its latest checkpoint
    model_cfg, trained = read_model_meta(ckpt)
    # a trained student decodes as it was trained; the untrained one with the AR head's shift
    diffusion = trained or DiffusionConfig(token_shift=True)
    job = JobConfig(
        model=model_cfg, diffusion=diffusion, precision=PrecisionConfig(transformer_impl="local")
    )
    distributed.initialize(ParallelConfig(), seed=1234)
    chunks = build_student(job)
    load_model_checkpoint(chunks, ckpt)
    if trained is None:
        init_mask_token_row(chunks, model_cfg)
    tokenizer = load_tokenizer(Path(ckpt) / TOKENIZER_DIR)
    return job, chunks, tokenizer, trained is not None


DYNAMIC = {"remasking": "dynamic"}
NO_CACHE = {"remasking": "static", "use_kv_cache": False}


def time_student(job, chunks, prompts, new_tokens, **rollout):
    from megatron_opdlm.diffusion.sampler import generate

    # EOS ignored: an id of the vocabulary padding can never be sampled
    model = dataclasses.replace(job.model, eos_token_ids=[job.model.padded_vocab_size - 1])
    block_size, diffusion = job.diffusion.block_size, job.diffusion
    rollout_cfg = dataclasses.replace(
        job.rollout, temperature=0.0, steps_per_block=block_size, **rollout
    )
    generate(chunks, prompts, model, diffusion, rollout_cfg, block_size)  # warm-up
    start = time.perf_counter()
    batch = generate(chunks, prompts, model, diffusion, rollout_cfg, new_tokens)
    seconds = time.perf_counter() - start
    tokens = int(batch.response_valid.sum())
    per_forward = (batch.response_lengths().float() / batch.num_forwards.float()).mean().item()
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "tokens_per_forward": per_forward,
        # the batch runs as many forwards as its slowest sequence
        "ms_per_forward": 1e3 * seconds / int(batch.num_forwards.max()),
    }


def time_teacher(hf_model, prompts, new_tokens):
    pad_id = hf_model.generation_config.pad_token_id
    if pad_id is None:
        pad_id = hf_model.generation_config.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])  # left padding
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run(n):
        return hf_model.generate(
            ids,
            attention_mask=attention,
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=pad_id,
        )

    with torch.no_grad():
        run(4)  # warm-up
        start = time.perf_counter()
        out = run(new_tokens)
        seconds = time.perf_counter() - start
    tokens = (out.shape[1] - width) * len(prompts)
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "tokens_per_forward": 1.0,
        "ms_per_forward": 1e3 * seconds / (out.shape[1] - width),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.no_cache_tokens is None:
        args.no_cache_tokens = args.new_tokens
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    hf_dir, ckpt = prepare(args)
    job, chunks, tokenizer, trained = load_student(ckpt)
    if args.block_size:
        job.diffusion = dataclasses.replace(job.diffusion, block_size=args.block_size)
    hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    all_prompts = [tokenizer.encode_prompt(q, chat=True) for q in QUESTIONS]
    results = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = (all_prompts * batch_size)[:batch_size]
        student = (job, chunks, prompts)
        runs = {
            "static": (time_student, (*student, args.new_tokens), {"remasking": "static"}),
            "dynamic 0.9": (
                time_student,
                (*student, args.new_tokens),
                DYNAMIC | {"threshold": 0.9},
            ),
            "dynamic 0.7": (
                time_student,
                (*student, args.new_tokens),
                DYNAMIC | {"threshold": 0.7},
            ),
            "no cache": (time_student, (*student, args.no_cache_tokens), NO_CACHE),
            "AR teacher": (time_teacher, (hf_model, prompts, args.new_tokens), {}),
        }
        for name, (fn, fn_args, kwargs) in runs.items():
            if args.runs and name not in args.runs.split(","):
                continue
            row = {"batch": batch_size, "run": name, **fn(*fn_args, **kwargs)}
            results.append(row)
            print(
                f"  b={batch_size} {name:12s} {row['tokens']:5d} tok {row['seconds']:8.2f} s "
                f"{row['tokens_per_s']:8.2f} tok/s {row['tokens_per_forward']:5.2f} tok/fwd",
                flush=True,
            )
    summary = ratios(results)
    print_table(results, summary)
    meta = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "new_tokens": args.new_tokens,
        "no_cache_tokens": args.no_cache_tokens,
        "block_size": job.diffusion.block_size,
        "token_shift": job.diffusion.token_shift,
        "student_trained": trained,
        "ckpt": str(ckpt),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps({"meta": meta, "results": results, "ratios": summary}, indent=2))
    tmp.rename(out)
    print(f"wrote {out}")
    return 0


def ratios(results):
    """Ratios of tokens/s within each batch size (the pairs that were run)."""
    pairs = {
        "cache_speedup_static": ("static", "no cache"),
        "dynamic_0.9_vs_ar": ("dynamic 0.9", "AR teacher"),
        "dynamic_0.7_vs_ar": ("dynamic 0.7", "AR teacher"),
        "static_vs_ar": ("static", "AR teacher"),
    }
    summary = {}
    for batch_size in sorted({r["batch"] for r in results}):
        rows = {r["run"]: r for r in results if r["batch"] == batch_size}
        summary[f"b{batch_size}"] = {
            key: rows[a]["tokens_per_s"] / rows[b]["tokens_per_s"]
            for key, (a, b) in pairs.items()
            if a in rows and b in rows
        }
        if "static" in rows and "AR teacher" in rows:  # what one denoising round costs
            summary[f"b{batch_size}"]["static_forward_vs_ar_step"] = (
                rows["static"]["ms_per_forward"] / rows["AR teacher"]["ms_per_forward"]
            )
    return summary


def print_table(results, summary):
    print("\n| batch | run | tokens | seconds | tokens/s | tokens/forward | ms/forward |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['batch']} | {r['run']} | {r['tokens']} | {r['seconds']:.2f} | "
            f"{r['tokens_per_s']:.2f} | {r['tokens_per_forward']:.2f} | "
            f"{r['ms_per_forward']:.1f} |"
        )
    print("\n| batch | ratio (tokens/s) | value |\n|---|---|---|")
    for name, values in summary.items():
        for key, value in values.items():
            print(f"| {name[1:]} | {key} | {value:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
