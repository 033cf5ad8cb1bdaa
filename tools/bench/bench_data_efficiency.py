"""Data efficiency: OPDLM vs masked-diffusion SFT vs off-policy distillation, same student init.

    python tools/bench/bench_data_efficiency.py                      # ~90 min on 2 CPU cores
    python tools/bench/bench_data_efficiency.py --teacher CKPT --methods opdlm mdlm_sft

Every method starts from the same converted teacher (SmolLM2-135M-Instruct by default), sees the
same prompts in the same order and the same optimizer settings (examples/configs/demo_smollm2.yaml),
and is trained for the same wall-clock budget. `mdlm_sft` (cross-entropy on random masks, the
SDAR/BD3LM way) and `offpolicy` (KL to the teacher on random masks) train on teacher-written
responses, generated first by the teacher's own AR decoding; `opdlm` rolls out with the student.

Quality is the trainer's held-out evaluation: mean forward KL(teacher || student) on the
student's own on-policy states over the held-out prompts (the same prompts and seed for every
method). Training tokens are the response tokens the student was trained on (rollout or data).
The report gives, for each method, the tokens needed to first reach a target KL (by default the
loosest of the methods' best levels, so that every method reaches it) and the ratio to OPDLM,
then the same for a ladder of KL levels (one level from noisy evaluations can flatter a method).
A full run and what it showed: docs/data_efficiency/.
Writes JSON, a markdown table and a PNG under --run-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "megatron_opdlm" / "data" / "bundled"
CONFIG = ROOT / "examples" / "configs" / "demo_smollm2.yaml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run-dir", default="runs/bench/data_efficiency")
    p.add_argument("--teacher", help="converted teacher checkpoint (default: convert SmolLM2)")
    p.add_argument("--methods", nargs="+", default=["opdlm", "mdlm_sft", "offpolicy"])
    p.add_argument("--minutes", type=float, default=25.0, help="training budget per method")
    p.add_argument(
        "--num-prompts", type=int, default=256, help="training prompts (teacher-answered)"
    )
    p.add_argument("--eval-interval", type=int, default=3, help="rollout steps between evaluations")
    p.add_argument("--eval-prompts", type=int, default=8, help="held-out prompts per evaluation")
    p.add_argument("--target-kl", type=float, help="quality target (default: see module doc)")
    p.add_argument("overrides", nargs="*", help="extra training overrides for every method")
    return p.parse_args(argv)


def _run(command: list[str]) -> None:
    print("[bench] $ " + " ".join(command), flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(command, check=True, cwd=ROOT, env=env)


def teacher_checkpoint(run: Path, given: str | None) -> Path:
    if given:
        return Path(given)
    ckpt = run / "teacher_ckpt"
    if not ckpt.exists():
        from megatron_opdlm.conversion.smollm2 import materialize_smollm2_hf

        hf = materialize_smollm2_hf(run / "hf_teacher")
        _run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf-dir", str(hf),
              "--out", str(ckpt), "--no-progress"])  # fmt: skip
    return ckpt


def teacher_responses(run: Path, teacher: Path, num_prompts: int, max_new_tokens: int) -> Path:
    """The first prompts of the bundled train split, answered by the teacher (greedy AR)."""
    out = run / "train_with_teacher_responses.jsonl"
    if out.exists():
        return out
    prompts = run / "train_prompts.jsonl"
    lines = (BUNDLED / "prompts_train.jsonl").read_text().splitlines()[:num_prompts]
    prompts.write_text("\n".join(lines) + "\n")
    generated = run / "teacher_generations.jsonl"
    _run([sys.executable, "tools/generate.py", "--ckpt", str(teacher), "--prompts", str(prompts),
          "--chat", "--block-size", "1", "--token-shift", "--steps-per-block", "1",
          "--max-new-tokens", str(max_new_tokens), "--output", str(generated)])  # fmt: skip
    records = [json.loads(line) for line in lines]
    answers = [json.loads(line) for line in generated.read_text().splitlines()]
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("w") as f:
        for record, answer in zip(records, sorted(answers, key=lambda a: a["index"]), strict=True):
            f.write(json.dumps({"id": record["id"], "prompt": record["prompt"],
                                "response_ids": answer["tokens"]}) + "\n")  # fmt: skip
    tmp.rename(out)
    return out


def train(run: Path, method: str, teacher: Path, data: Path, args) -> Path:
    method_dir = run / method
    if (method_dir / "COMPLETE").exists():
        return method_dir
    _run([sys.executable, "tools/train.py", "--config", str(CONFIG),
          f"distill.mode={method}", f"checkpoint.teacher={teacher}",
          f"checkpoint.save_dir={method_dir / 'checkpoints'}", f"train.run_dir={method_dir}",
          f"train.deadline_minutes={args.minutes}", "train.rollout_steps=1000",
          f"train.eval_interval={args.eval_interval}", f"data.train_prompts={data}",
          f"data.eval_prompts={BUNDLED / 'prompts_heldout.jsonl'}",
          f"data.eval_limit={args.eval_prompts}", *args.overrides])  # fmt: skip
    (method_dir / "COMPLETE").write_text("done\n")
    return method_dir


def curve(method_dir: Path) -> list[tuple[int, float]]:
    """(training tokens, held-out KL) at each evaluation of a run."""
    records = [json.loads(line) for line in (method_dir / "metrics.jsonl").read_text().splitlines()]
    tokens_by_step: dict[int, int] = {}
    for record in records:
        if record.get("kind") == "train":
            tokens_by_step.setdefault(int(record["rollout_step"]), int(record["rollout_tokens"]))
    points = []
    for record in records:
        if record.get("kind") == "eval":
            step = int(record["rollout_step"])  # evaluated before this rollout step ran
            seen = sum(t for s, t in tokens_by_step.items() if s < step)
            points.append((seen, float(record["kl"])))
    return points


LEVELS = (2.4, 2.2, 2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.4, 1.3, 1.2, 1.1, 1.0)


def tokens_to_reach(points: list[tuple[int, float]], target: float) -> int | None:
    for tokens, kl in points:
        if kl <= target:
            return tokens
    return None


def report(curves: dict[str, list[tuple[int, float]]], target: float | None, run: Path) -> dict:
    if target is None:
        # the best KL every method reached: all can be compared on it
        target = max(min(kl for _, kl in points) for points in curves.values())
    needed = {method: tokens_to_reach(points, target) for method, points in curves.items()}
    base = needed.get("opdlm")
    rows = []
    for method, points in curves.items():
        tokens = needed[method]
        ratio = tokens / base if tokens is not None and base else None
        rows.append({"method": method, "start_kl": points[0][1], "final_kl": points[-1][1],
                     "tokens_trained": points[-1][0], "tokens_to_target": tokens,
                     "ratio_to_opdlm": ratio})  # fmt: skip
    # one target from noisy evaluations (a few held-out prompts) can flatter either method:
    # the tokens to first reach each of a ladder of KL levels show the whole picture
    best = min(kl for points in curves.values() for _, kl in points)  # what any method reached
    ladder = {
        f"{level:.2f}": {method: tokens_to_reach(pts, level) for method, pts in curves.items()}
        for level in LEVELS
        if level >= best
    }
    result = {"target_kl": target, "rows": rows, "levels": ladder, "curves": curves}
    (run / "data_efficiency.json").write_text(json.dumps(result, indent=2))
    lines = [f"target: held-out on-policy KL <= {target:.3f}", "",
             "| method | KL at start | KL at end | tokens trained | tokens to target | x OPDLM |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        ratio = f"{row['ratio_to_opdlm']:.2f}" if row["ratio_to_opdlm"] is not None else "-"
        reached = row["tokens_to_target"] if row["tokens_to_target"] is not None else "not reached"
        lines.append(f"| {row['method']} | {row['start_kl']:.3f} | {row['final_kl']:.3f} | "
                     f"{row['tokens_trained']} | {reached} | {ratio} |")  # fmt: skip
    methods = list(curves)
    lines += ["", "tokens to first reach each KL level (x OPDLM in brackets):", "",
              "| KL <= | " + " | ".join(methods) + " |",
              "|---" * (len(methods) + 1) + "|"]  # fmt: skip
    for level, needed_at in ladder.items():
        cells = []
        for method in methods:
            tokens, base_tokens = needed_at[method], needed_at.get("opdlm")
            if tokens is None:
                cells.append("not reached")
            elif method != "opdlm" and base_tokens:
                cells.append(f"{tokens} ({tokens / base_tokens:.2f}x)")
            else:
                cells.append(str(tokens))
        lines.append(f"| {level} | " + " | ".join(cells) + " |")
    (run / "data_efficiency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 4))
        for method, points in curves.items():
            axis.plot([t for t, _ in points], [k for _, k in points], marker="o", label=method)
        axis.axhline(target, color="grey", linestyle="--", linewidth=1, label="target")
        axis.set_xlabel("training tokens (responses)")
        axis.set_ylabel("held-out on-policy KL(teacher || student)")
        axis.legend()
        figure.tight_layout()
        figure.savefig(run / "data_efficiency.png", dpi=120)
    except ImportError:
        print("[bench] matplotlib missing: no plot")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Path(args.run_dir).absolute()
    run.mkdir(parents=True, exist_ok=True)
    teacher = teacher_checkpoint(run, args.teacher)
    data = teacher_responses(run, teacher, args.num_prompts, max_new_tokens=48)
    curves = {m: curve(train(run, m, teacher, data, args)) for m in args.methods}
    report(curves, args.target_kl, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
