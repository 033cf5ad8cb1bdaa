"""Evaluate Megatron checkpoints (teacher or student) against the AR teacher.

    # the teacher, the student before OPDLM (teacher weights, block 4) and a trained student
    python tools/evaluate.py --teacher runs/demo/teacher \
        --model teacher=runs/demo/teacher --model student_init=runs/demo/teacher \
        --diffusion-init student_init --model student=runs/demo/checkpoints \
        --qa-items 64 --heldout-prompts 16 --out runs/demo/eval.json

    # checkpoints of one run as one series ("<series>@<label>"), plotted over training tokens
    python tools/evaluate.py --teacher runs/demo/teacher --model init=runs/demo/teacher \
        --diffusion-init init --model opdlm@2=runs/demo/ckpt/iter_0000002 \
        --model opdlm@4=runs/demo/ckpt/iter_0000004 --training-tokens opdlm@2=5000 \
        --training-tokens opdlm@4=10000 --out runs/demo/eval_steps.json --plot runs/demo/eval.png

    # or from several evaluation JSONs
    python tools/evaluate.py --plot runs/demo/eval.png --plot-from runs/demo/eval_*.json

Prints a quality table (QA exact match, teacher NLL of greedy answers, on-policy KL) and a
decoding table (tokens per forward, tokens/s, teacher NLL under ar / static / dynamic_<t>), and
writes JSON (format in megatron_opdlm/evaluation/report.py). Runs on one process, or under
torchrun with --tp/--pp (every rank decodes the same prompts).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_opdlm.cli_errors import ArgumentParser, report_usage_error, run_cli  # noqa: E402
from megatron_opdlm.evaluation import report  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description="Evaluate AR / block-diffusion checkpoints")
    p.add_argument("--teacher", help="AR teacher checkpoint (scores NLL and KL)")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=CKPT",
        help="a checkpoint to evaluate (repeatable); default: the teacher alone",
    )
    p.add_argument(
        "--diffusion-init",
        action="append",
        default=[],
        metavar="NAME",
        help="evaluate model NAME (an AR checkpoint) as an untrained block-diffusion "
        "student with --block-size / --token-shift",
    )
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--token-shift", action="store_true")
    p.add_argument(
        "--training-tokens",
        action="append",
        default=[],
        metavar="NAME=N",
        help="training tokens of model NAME (else read from its trainer_state.json)",
    )
    p.add_argument("--qa", default=None, help="QA JSONL (default: the bundled qa.jsonl)")
    p.add_argument("--heldout", default=None, help="held-out prompts JSONL (default: bundled)")
    p.add_argument("--qa-items", type=int, default=64, help="first N QA items; 0 = skip QA")
    p.add_argument("--heldout-prompts", type=int, default=16, help="first N held-out prompts")
    p.add_argument("--max-new-tokens", type=int, default=48, help="held-out response cap")
    p.add_argument("--qa-max-new-tokens", type=int, default=24, help="QA answer cap")
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="rollout engine slots: prompts decoded at once (continuous batching)",
    )
    p.add_argument("--examples", type=int, default=6, help="QA answers kept in the JSON per model")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.95, 0.9, 0.8])
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument(
        "--chat-template-kwargs",
        action="append",
        metavar="KEY=VALUE",
        help="a chat-template variable for the QA and held-out prompts (repeatable), e.g. "
        "enable_thinking=false, or a mapping '{enable_thinking: false}'",
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--plot", default=None, help="write a PNG of metrics vs training tokens")
    p.add_argument("--plot-from", nargs="+", default=[], help="evaluation JSONs for --plot")
    return p.parse_args(argv)


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"{flag} {value!r}: expected NAME=VALUE")
        if name in out:
            raise ValueError(f"{flag}: {name!r} given twice")
        out[name] = rest
    return out


def check_args(args) -> tuple[dict[str, str], dict[str, int]]:
    """Every argument problem before a model is built (sets args.template_kwargs)."""
    from megatron_opdlm.data.tokenizer import parse_template_kwargs

    args.template_kwargs = parse_template_kwargs(
        args.chat_template_kwargs, "--chat-template-kwargs"
    )
    models = _pairs(args.model, "--model")
    tokens = {k: int(v) for k, v in _pairs(args.training_tokens, "--training-tokens").items()}
    evaluating = bool(models) or args.teacher is not None
    if not evaluating and not args.plot_from:
        raise ValueError("nothing to do: give --teacher (and --model NAME=CKPT), or --plot-from")
    if args.plot_from and not args.plot:
        raise ValueError("--plot-from needs --plot OUT.png")
    if models and args.teacher is None:
        raise ValueError("--model needs --teacher: the AR teacher scores every model")
    for name in [*args.diffusion_init, *tokens]:
        if name not in models:
            raise ValueError(f"{name!r} is not a --model name (have {sorted(models)})")
    for path in [args.teacher, *models.values()]:
        if path is not None and not Path(path).is_dir():
            raise ValueError(f"checkpoint {path!r} is not a directory")
    if args.block_size < 1 or args.max_new_tokens < 1 or args.heldout_prompts < 0:
        raise ValueError("--block-size, --max-new-tokens must be >= 1, --heldout-prompts >= 0")
    if args.max_new_tokens % args.block_size:
        raise ValueError(
            f"--max-new-tokens={args.max_new_tokens} is not a multiple of "
            f"--block-size={args.block_size}"
        )
    if args.qa_items == 0 and args.heldout_prompts == 0 and evaluating:
        raise ValueError("--qa-items 0 and --heldout-prompts 0: nothing to evaluate")
    return models, tokens


def evaluate(args, models: dict[str, str], tokens: dict[str, int]) -> tuple[dict, bool]:
    """(the result, whether this process prints it)."""
    import torch

    from megatron_opdlm.checkpoint_layout import TOKENIZER_DIR, resolve_checkpoint_dir
    from megatron_opdlm.config import DiffusionConfig, ParallelConfig, PrecisionConfig
    from megatron_opdlm.data.tokenizer import load_tokenizer
    from megatron_opdlm.evaluation import inputs
    from megatron_opdlm.evaluation.evaluator import EvalSettings, evaluate_model
    from megatron_opdlm.evaluation.models import load_eval_model
    from megatron_opdlm.runtime import distributed

    if args.threads:
        torch.set_num_threads(args.threads)
    parallel = ParallelConfig(tp=args.tp, pp=args.pp)
    precision = PrecisionConfig(dtype=args.dtype)
    distributed.initialize(parallel, seed=args.seed)
    try:
        tokenizer = load_tokenizer(resolve_checkpoint_dir(args.teacher) / TOKENIZER_DIR)
        qa = heldout = []
        if args.qa_items:
            records = inputs.read_jsonl(args.qa or inputs.QA_SET, args.qa_items, need_answer=True)
            qa = inputs.tokenize(
                records, tokenizer, args.max_prompt_length, template_kwargs=args.template_kwargs
            )
        if args.heldout_prompts:
            records = inputs.read_jsonl(
                args.heldout or inputs.HELDOUT_PROMPTS, args.heldout_prompts
            )
            heldout = inputs.tokenize(
                records, tokenizer, args.max_prompt_length, template_kwargs=args.template_kwargs
            )
        settings = EvalSettings(
            args.max_new_tokens,
            args.qa_max_new_tokens,
            args.batch_size,
            tuple(args.thresholds),
            args.seed,
            args.examples,
        )
        teacher = load_eval_model("teacher", args.teacher, parallel, precision)
        if not teacher.is_ar:
            raise ValueError(f"--teacher {args.teacher} is a diffusion model; pass the AR teacher")
        init = DiffusionConfig(block_size=args.block_size, token_shift=args.token_shift)
        records = []
        for name, path in (models or {"teacher": args.teacher}).items():
            same_as_teacher = (
                resolve_checkpoint_dir(path).resolve()
                == resolve_checkpoint_dir(args.teacher).resolve()
                and name not in args.diffusion_init
            )
            if same_as_teacher:  # the same weights: share the teacher's chunks
                model = dataclasses.replace(teacher, name=name, training_tokens=tokens.get(name))
            else:
                model = load_eval_model(
                    name,
                    path,
                    parallel,
                    precision,
                    init if name in args.diffusion_init else None,
                    tokens.get(name),
                )
            began = time.perf_counter()
            records.append(evaluate_model(model, teacher, qa, heldout, tokenizer, settings))
            records[-1]["eval_seconds"] = time.perf_counter() - began
            del model  # free a student before building the next one
        result = {
            "format": report.FORMAT,
            "settings": {
                **vars(settings),
                "qa_items": len(qa),
                "heldout_prompts": len(heldout),
                "teacher": str(args.teacher),
                "dtype": args.dtype,
                "tp": args.tp,
                "pp": args.pp,
                "chat_template_kwargs": args.template_kwargs,
            },
            "environment": {
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "cuda": torch.cuda.is_available(),
                "torch": torch.__version__,
            },
            "models": records,
        }
        return result, distributed.is_rank0()
    finally:
        distributed.shutdown()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        models, tokens = check_args(args)
    except ValueError as exc:
        return report_usage_error(exc)
    results = report.read_results(args.plot_from) if args.plot_from else []
    if args.teacher is not None:
        try:
            result, printer = evaluate(args, models, tokens)
        except ValueError as exc:
            return report_usage_error(exc)
        if not printer:
            return 0
        print(report.format_tables(result))
        if args.out:
            print(f"wrote {report.write_json(result, args.out)}")
        results.append(result)
    if args.plot and results:
        print(f"wrote {report.plot(results, args.plot)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
