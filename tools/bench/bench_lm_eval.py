"""lm-eval wall time of the local QA task: Megatron backend vs the HF export, batch 1 and 8.

    python tools/bench/bench_lm_eval.py [--student CKPT] [--limit 16] [--batch-sizes 1,8]

`--student`: a Megatron student checkpoint (e.g. runs/demo/train/checkpoints). Without it the
bundled SmolLM2-135M teacher is converted and used as a block-4 token-shift student with 0
training steps (the demo's settings). The student is exported to HF once (next to --out). Each
row is one lm_eval.simple_evaluate of `opdlm_qa` (--apply_chat_template, greedy, max_gen_toks
24) through the `opdlm` backend, both models loaded once and the rows interleaved; every row runs
in this one process, so compare rows as ratios. `generate s` is the time inside generate_until (the
decoding), `wall s` the whole simple_evaluate call. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
TASKS = ROOT / "megatron_opdlm" / "evaluation" / "lm_eval_tasks"


def default_student(work: Path) -> Path:
    from megatron_opdlm.checkpoint_layout import read_model_meta, write_model_meta
    from megatron_opdlm.config import DiffusionConfig
    from megatron_opdlm.conversion.hf_to_megatron import convert_hf_to_megatron
    from megatron_opdlm.conversion.smollm2 import materialize_smollm2_hf

    hf = materialize_smollm2_hf(work / "hf")
    teacher = work / "teacher"
    if not (teacher / "opdlm_model.yaml").is_file():
        convert_hf_to_megatron(hf, teacher)
    student = work / "student"
    student.mkdir(exist_ok=True)
    for name in ("model", "tokenizer"):
        if not (student / name).exists():
            (student / name).symlink_to((teacher / name).resolve())
    cfg, _ = read_model_meta(teacher)
    write_model_meta(student, cfg, DiffusionConfig(block_size=4, token_shift=True))
    return student


def run_task(lm, task_manager, limit: int) -> tuple[dict, float, float]:
    """(metrics, wall seconds of simple_evaluate, seconds inside generate_until)."""
    import lm_eval

    lm.stats = {"generated_tokens": 0, "forwards": 0, "requests": 0}
    inner = {"seconds": 0.0}
    generate_until = type(lm).generate_until

    def timed(requests, disable_tqdm=False):
        began = time.perf_counter()
        try:
            return generate_until(lm, requests, disable_tqdm=True)
        finally:
            inner["seconds"] += time.perf_counter() - began

    lm.generate_until = timed
    start = time.perf_counter()
    result = lm_eval.simple_evaluate(
        model=lm, tasks=["opdlm_qa"], task_manager=task_manager, limit=limit,
        apply_chat_template=True,
    )  # fmt: skip
    del lm.generate_until
    return result["results"]["opdlm_qa"], time.perf_counter() - start, inner["seconds"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--student", default=None, help="Megatron student checkpoint")
    p.add_argument("--limit", type=int, default=16, help="QA items")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--remasking", default="static,dynamic", help="settings to time")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default="runs/bench/bench_lm_eval.json")
    args = p.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    settings = args.remasking.split(",")
    if args.limit < 1 or min(batch_sizes) < 1 or not set(settings) <= {"static", "dynamic"}:
        print("error: --limit and --batch-sizes must be >= 1, --remasking static,dynamic",
              file=sys.stderr)  # fmt: skip
        return 2
    import torch

    torch.set_num_threads(args.threads)
    from megatron_opdlm.conversion.megatron_to_hf import convert_megatron_to_hf
    from megatron_opdlm.evaluation.lm_eval_backend import OpdlmLM

    out = Path(args.out)
    work = out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    student = Path(args.student) if args.student else default_student(work)
    export = work / "export"
    if not export.is_dir():
        convert_megatron_to_hf(student, export)
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=str(TASKS))  # indexing every task is slow: once
    rows = []
    # both models loaded, rows interleaved: load drifts on a shared machine hit both alike
    lms = {"megatron": OpdlmLM(pretrained=str(student)), "hf": OpdlmLM(pretrained=str(export))}
    for remasking in settings:
        for batch_size in batch_sizes:
            for backend, lm in lms.items():
                lm.rollout.remasking, lm.batch_size = remasking, batch_size
                metrics, seconds, generate_seconds = run_task(lm, task_manager, args.limit)
                stats = dict(lm.stats)
                rows.append({
                    "backend": backend, "remasking": remasking, "batch_size": batch_size,
                    "seconds": seconds, "generate_seconds": generate_seconds,
                    "exact_match": metrics["exact_match,none"],
                    "tokens": stats["generated_tokens"], "forwards": stats["forwards"],
                    "tokens_per_forward": stats["generated_tokens"] / max(1, stats["forwards"]),
                })  # fmt: skip
                print(f"[bench] {rows[-1]}", flush=True)
    for lm in lms.values():
        lm.engine.close()
    base = {(r["remasking"], r["batch_size"]): r["generate_seconds"] for r in rows
            if r["backend"] == "hf"}  # fmt: skip
    print("| backend | remasking | batch | wall s | generate s | vs HF | exact match | "
          "tokens/forward |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        ratio = r["generate_seconds"] / base[(r["remasking"], r["batch_size"])]
        r["generate_seconds_vs_hf"] = ratio
        cells = [
            r["backend"],
            r["remasking"],
            r["batch_size"],
            f"{r['seconds']:.1f}",
            f"{r['generate_seconds']:.1f}",
            f"{ratio:.2f}",
            f"{r['exact_match']:.3f}",
            f"{r['tokens_per_forward']:.2f}",
        ]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    report = {
        "benchmark": "lm_eval opdlm_qa through the opdlm backend",
        "student": str(student) if args.student else "SmolLM2-135M teacher as block-4 "
        "token-shift student, 0 training steps",
        "limit": args.limit, "threads": args.threads,
        "environment": {"machine": platform.machine(), "cpus": os.cpu_count(),
                        "torch": torch.__version__},
        "rows": rows,
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.rename(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
