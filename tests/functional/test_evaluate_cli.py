"""tools/evaluate.py end to end on tiny checkpoints: teacher, untrained student, "trained" one."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.unit.test_evaluation_support import (
    save_tiny_teacher,
    tiny_teacher_job,
    write_char_tokenizer,
)

ROOT = Path(__file__).resolve().parents[2]


def _cli():
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "tools" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save_student(directory: Path, teacher_dir: Path, tokenizer_dir: Path) -> Path:
    """A diffusion checkpoint: the teacher's weights, slightly perturbed, block size 4."""
    from megatron_opdlm.checkpoint_layout import load_model_checkpoint, save_model_checkpoint
    from megatron_opdlm.config import DiffusionConfig
    from megatron_opdlm.models.builder import build_student

    job = tiny_teacher_job()
    chunks = build_student(job)
    load_model_checkpoint(chunks, teacher_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in chunks[0].parameters():
            param.add_(0.01 * torch.randn_like(param))
    save_model_checkpoint(
        chunks, directory, job.model, DiffusionConfig(block_size=4), tokenizer_dir
    )
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from megatron_opdlm.config import ParallelConfig
    from megatron_opdlm.runtime import distributed

    root = tmp_path_factory.mktemp("eval")
    tokenizer = write_char_tokenizer(root / "tokenizer")
    distributed.initialize(ParallelConfig(), seed=0)
    try:
        teacher = save_tiny_teacher(root / "teacher", tokenizer)
        student = _save_student(root / "student", teacher, tokenizer)
    finally:
        distributed.shutdown()
    return root, teacher, student


@pytest.mark.slow
def test_evaluate_three_models_then_plot(checkpoints):
    root, teacher, student = checkpoints
    out = root / "eval.json"
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "evaluate.py"),
        "--teacher",
        str(teacher),
        "--model",
        f"teacher={teacher}",
        "--model",
        f"init={teacher}",
        "--diffusion-init",
        "init",
        "--model",
        f"student={student}",
        "--training-tokens",
        "student=1000",
        "--qa-items",
        "4",
        "--heldout-prompts",
        "3",
        "--max-new-tokens",
        "8",
        "--qa-max-new-tokens",
        "8",
        "--batch-size",
        "2",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    # a fresh launch: no rendezvous variables left over from this test process
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "KL(T||S)" in done.stdout and "dynamic_0.8" in done.stdout
    result = json.loads(out.read_text())
    models = {m["name"]: m for m in result["models"]}
    assert list(models) == ["teacher", "init", "student"]
    assert models["teacher"]["kind"] == "ar" and list(models["teacher"]["decoding"]) == ["ar"]
    assert abs(models["teacher"]["kl"]) < 1e-6  # the teacher scored as its own AR student
    assert models["init"]["kind"] == "diffusion" and models["init"]["training_tokens"] == 0
    assert models["init"]["block_size"] == 4 and models["init"]["kl"] > 0.01
    assert models["student"]["training_tokens"] == 1000
    for model in models.values():
        assert model["qa"]["total"] == 4 and 0.0 <= model["qa"]["accuracy"] <= 1.0
        assert model["teacher_nll"] > 0
    assert set(models["student"]["decoding"]) == {
        "static",
        "dynamic_0.95",
        "dynamic_0.9",
        "dynamic_0.8",
    }
    assert result["settings"]["heldout_prompts"] == 3

    later = json.loads(out.read_text())  # a later evaluation of the same run
    later["models"] = [dict(models["student"], training_tokens=3000)]
    (root / "later.json").write_text(json.dumps(later))
    png = root / "plot.png"
    assert _cli().main(["--plot", str(png), "--plot-from", str(out), str(root / "later.json")]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_argument_errors_name_the_problem(checkpoints, capsys):
    root, teacher, student = checkpoints
    cli = _cli()
    cases = [
        (["--model", f"a={teacher}"], "--model needs --teacher"),
        (
            ["--teacher", str(teacher), "--model", f"a={teacher}", "--diffusion-init", "b"],
            "'b' is not a --model name",
        ),
        (["--teacher", str(root / "missing")], "is not a directory"),
        (["--teacher", str(teacher), "--max-new-tokens", "10"], "not a multiple of --block-size=4"),
        (["--plot-from", "x.json"], "--plot-from needs --plot"),
        (["--teacher", str(teacher), "--model", "a"], "expected NAME=VALUE"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        assert message in capsys.readouterr().err
    # found after the parallel state is up, before any model is evaluated
    argv = ["--teacher", str(teacher), "--model", f"s={student}", "--diffusion-init", "s"]
    assert cli.main(argv) == 2
    assert "already a diffusion model" in capsys.readouterr().err
    assert cli.main(["--teacher", str(student)]) == 2
    assert "is a diffusion model; pass the AR teacher" in capsys.readouterr().err
