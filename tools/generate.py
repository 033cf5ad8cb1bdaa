"""Generate text with the rollout engine from a Megatron checkpoint (teacher or student).

    python tools/generate.py --ckpt CKPT --prompt "What is 7 * 8?" --chat --max-new-tokens 64
    python tools/generate.py --ckpt QWEN3_CKPT --prompt "Hi" --chat \
        --chat-template-kwargs enable_thinking=false   # a variable of the chat template
    python tools/generate.py --ckpt CKPT --prompts prompts.txt --remasking dynamic --threshold 0.9
    torchrun --nproc-per-node 2 tools/generate.py --ckpt CKPT --prompts prompts.jsonl --tp 2

--prompts: a text file with one prompt per line, or JSONL records with a "prompt" (text) or
"messages" (chat turns) field, as in training prompt files. A checkpoint without a
DiffusionConfig is an AR teacher: it decodes with token shift (its head predicts the next
token), and with --block-size 1 that is exactly greedy AR decoding.
Data-parallel ranks (world / (tp * pp)) split the prompts; each rank decodes its prompts on
--batch-size slots (continuous batching: a finished sequence's slot takes the next prompt);
rank 0 prints every result, then tokens/s and tokens per forward. Sampling is reproducible for a
given --seed and data-parallel size; with the KV cache also whatever --batch-size (every
sequence draws from its own random stream; --no-kv-cache decodes lock-step batches of
--batch-size that share one generator).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from megatron_opdlm.cli_errors import ArgumentParser, UsageError, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory (or a trainer save dir)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt (text)")
    source.add_argument("--prompts", help="file: one prompt per line, or JSONL with 'prompt'")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    p.add_argument(
        "--chat-template-kwargs",
        action="append",
        metavar="KEY=VALUE",
        help="a chat-template variable (repeatable), e.g. enable_thinking=false, or a mapping "
        "'{enable_thinking: false}'; needs --chat",
    )
    p.add_argument("--block-size", type=int, help="default: the checkpoint's (4 for a teacher)")
    shift = p.add_mutually_exclusive_group()
    shift.add_argument("--token-shift", dest="token_shift", action="store_true", default=None)
    shift.add_argument("--no-token-shift", dest="token_shift", action="store_false")
    p.add_argument("--steps-per-block", type=int, help="default: the block size (1 token/step)")
    p.add_argument("--remasking", default="static", help="static | dynamic")
    p.add_argument("--threshold", type=float, default=0.9, help="dynamic: confidence threshold")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="slots per data-parallel rank: prompts decoded at once (continuous batching: a "
        "finished sequence's slot takes the next prompt; KV memory grows with it)",
    )
    p.add_argument("--no-kv-cache", action="store_true", help="recompute everything each round")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--output", help="also write one JSON line per prompt here")
    return p.parse_args(argv)


def read_prompts(args) -> list:
    """Prompt texts or chat-message lists; UsageError naming the file and line of a bad one."""
    from megatron_opdlm.data.prompts import iter_jsonl

    if args.prompt is not None:
        if not args.prompt.strip():
            raise UsageError("--prompt", "is empty", "give the text to generate from")
        return [args.prompt]
    path = Path(args.prompts)
    if not path.is_file():
        raise UsageError(f"--prompts {path}", "does not exist", "give a .txt or .jsonl file")
    if path.suffix != ".jsonl":
        try:
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise UsageError(f"--prompts {path}", "is not UTF-8 text", "give a text file") from None
    else:
        lines = []
        for where, _, record in iter_jsonl(path):
            lines.append(_jsonl_prompt(record, where))
    if not lines:
        raise UsageError(f"--prompts {path}", "holds no prompts", "write one prompt per line")
    return lines


def _jsonl_prompt(record, where: str):
    """The "prompt" (text) or "messages" (chat turns) of one JSONL record, as the trainer reads."""
    from megatron_opdlm.data.prompts import check_messages

    fix = 'give {"prompt": "text"} or {"messages": [{"role": "user", "content": "text"}]}'
    if not isinstance(record, dict) or ("prompt" in record) == ("messages" in record):
        raise UsageError(where, "needs exactly one of 'prompt' and 'messages'", fix)
    if "messages" in record:
        return check_messages(record["messages"], where)
    if isinstance(record["prompt"], list):  # chat turns under "prompt", as earlier versions read
        return check_messages(record["prompt"], where)
    if not isinstance(record["prompt"], str) or not record["prompt"].strip():
        raise UsageError(where, "'prompt' must be a non-empty string", fix)
    return record["prompt"]


def chat_template_kwargs(args) -> dict:
    """--chat-template-kwargs as a dict (checked like data.chat_template_kwargs)."""
    from megatron_opdlm.data.tokenizer import parse_template_kwargs

    kwargs = parse_template_kwargs(args.chat_template_kwargs, "--chat-template-kwargs")
    if kwargs and not args.chat:
        raise UsageError(
            "--chat-template-kwargs", "is given without --chat", "add --chat to use the template"
        )
    return kwargs


def encode_prompts(tokenizer, texts: list, chat: bool, template_kwargs: dict) -> list[list[int]]:
    """Token ids of every prompt (chat template with `template_kwargs` when `chat`)."""
    prompts = [
        tokenizer.encode_prompt(t, chat=chat, template_kwargs=template_kwargs) for t in texts
    ]
    for index, ids in enumerate(prompts):
        if not ids:
            raise UsageError(f"prompt {index}", "tokenizes to nothing", "give a non-empty prompt")
    return prompts


def check_checkpoint(path: str) -> Path:
    """A checkpoint directory with its model and tokenizer, checked before anything is built."""
    from megatron_opdlm.checkpoint_layout import (
        MODEL_DIR,
        TOKENIZER_DIR,
        resolve_checkpoint_dir,
    )

    if not Path(path).is_dir():
        raise UsageError(f"--ckpt {path}", "is not a directory", "give a checkpoint directory")
    ckpt = resolve_checkpoint_dir(path)
    fix = "give a directory written by tools/convert_hf_to_megatron.py or tools/train.py"
    if not (ckpt / "opdlm_model.yaml").is_file():
        raise UsageError(f"--ckpt {path}", "is not a megatron-opdlm checkpoint", fix)
    if not (ckpt / MODEL_DIR / "metadata.json").is_file():
        raise UsageError(f"--ckpt {path}", f"has no weights ({MODEL_DIR}/metadata.json)", fix)
    if not (ckpt / TOKENIZER_DIR).is_dir():
        raise UsageError(f"--ckpt {path}", f"has no {TOKENIZER_DIR}/ directory", fix)
    return ckpt


def build_job(args, model_cfg, trained_diffusion):
    from megatron_opdlm.config import (
        DiffusionConfig,
        JobConfig,
        ParallelConfig,
        PrecisionConfig,
        RolloutConfig,
    )

    block = args.block_size or (trained_diffusion.block_size if trained_diffusion else 4)
    if args.token_shift is not None:
        token_shift = args.token_shift
    else:  # a teacher's head predicts the next token: decode it with the shift
        token_shift = trained_diffusion.token_shift if trained_diffusion else True
    rollout = RolloutConfig(
        steps_per_block=args.steps_per_block or block,
        remasking=args.remasking,
        threshold=args.threshold,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        use_kv_cache=not args.no_kv_cache,
    )
    job = JobConfig(
        model=model_cfg,
        diffusion=DiffusionConfig(block_size=block, token_shift=token_shift),
        parallel=ParallelConfig(tp=args.tp, pp=args.pp),
        precision=PrecisionConfig(dtype=args.dtype),
        rollout=rollout,
    )
    return job


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron.core import parallel_state

    from megatron_opdlm.checkpoint_layout import (
        TOKENIZER_DIR,
        load_model_checkpoint,
        read_model_meta,
    )
    from megatron_opdlm.data.tokenizer import load_tokenizer
    from megatron_opdlm.diffusion.engine import generate_rollout
    from megatron_opdlm.models.builder import build_student
    from megatron_opdlm.models.vocab import init_mask_token_row
    from megatron_opdlm.runtime import distributed

    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}", "must be >= 1", "give e.g. 8")
    texts = read_prompts(args)
    template_kwargs = chat_template_kwargs(args)
    ckpt = check_checkpoint(args.ckpt)
    model_cfg, trained_diffusion = read_model_meta(ckpt)
    job = build_job(args, model_cfg, trained_diffusion)
    launch = distributed.read_launch_env()
    job.validate(world_size=launch.world_size)
    tokenizer = load_tokenizer(ckpt / TOKENIZER_DIR)
    prompts = encode_prompts(tokenizer, texts, args.chat, template_kwargs)

    distributed.initialize(job.parallel, seed=args.seed)
    chunks = build_student(job)
    load_model_checkpoint(chunks, ckpt)
    if trained_diffusion is None:  # a teacher has no trained mask row: the mean embedding
        init_mask_token_row(chunks, model_cfg)

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mine = list(range(dp_rank, len(prompts), dp_size))
    generator = torch.Generator().manual_seed(args.seed + dp_rank)
    results, start = [], time.perf_counter()
    if mine:  # more data-parallel ranks than prompts: some have none
        batch = generate_rollout(
            chunks,
            [prompts[i] for i in mine],
            job.model,
            job.diffusion,
            job.rollout,
            args.max_new_tokens,
            slots=args.batch_size,
            generator=generator,  # sampling: one seed drawn, then per-sequence streams
        )
        for row, index in enumerate(mine):
            length = int(batch.response_valid[row].sum())
            tokens = batch.response_tokens[row, :length].tolist()
            forwards = int(batch.num_forwards[row])
            results.append(
                {
                    "index": index,
                    "prompt": texts[index],
                    "tokens": tokens,
                    "text": tokenizer.decode(tokens),
                    "forwards": forwards,
                }
            )
    seconds = time.perf_counter() - start

    gathered = [None] * dp_size if dp_size > 1 else [results]
    if dp_size > 1:
        torch.distributed.all_gather_object(
            gathered, results, group=parallel_state.get_data_parallel_group()
        )
    if distributed.is_rank0():
        report(
            sorted((r for part in gathered for r in part), key=lambda r: r["index"]),
            seconds,
            args.output,
        )
    distributed.shutdown()
    return 0


def report(results: list[dict], seconds: float, output: str | None) -> None:
    for result in results:
        per_forward = len(result["tokens"]) / max(1, result["forwards"])
        print(f"=== prompt {result['index']}: {result['prompt']!r}")
        print(result["text"])
        print(
            f"--- {len(result['tokens'])} tokens, {result['forwards']} forwards, "
            f"{per_forward:.2f} tokens/step"
        )
    tokens = sum(len(r["tokens"]) for r in results)
    forwards = sum(r["forwards"] for r in results)
    print(
        f"total: {tokens} tokens, {seconds:.2f} s wall on rank 0 "
        f"({tokens / max(seconds, 1e-9):.1f} tokens/s), {tokens / max(1, forwards):.2f} tokens/step"
    )
    if output:
        path = Path(output)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in results))
        tmp.rename(path)


if __name__ == "__main__":
    run_cli(main)
