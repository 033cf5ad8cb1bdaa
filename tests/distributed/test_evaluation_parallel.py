"""Evaluation metrics under TP=2 and PP=2 against TP=1 (2 gloo ranks, one spawn).

Both ranks save a tiny teacher and a tiny diffusion student at TP=1 (DP=2), then for each layout
load them resharded from the checkpoints, decode the same prompts greedily and compute the
teacher NLL and the on-policy KL. Tokens must be identical; the sums may differ from TP=1 only by
fp32 reduction order (logits ~1e-7 apart), so rel 1e-4 on sums of ~30 terms.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed

LAYOUTS = {"tp1": {}, "tp2": {"tp": 2}, "pp2": {"pp": 2}}


def _body(rank, world_size, root):
    from megatron_opdlm.checkpoint_layout import save_model_checkpoint
    from megatron_opdlm.config import DiffusionConfig, ParallelConfig
    from megatron_opdlm.evaluation import decoding, metrics
    from megatron_opdlm.evaluation.models import load_eval_model
    from megatron_opdlm.models.builder import build_student
    from megatron_opdlm.runtime import distributed
    from tests.unit.test_evaluation_support import (
        random_prompts,
        save_tiny_teacher,
        tiny_teacher_job,
    )

    root = Path(root)
    distributed.initialize(ParallelConfig(), seed=0)
    teacher_dir = save_tiny_teacher(root / "teacher", None, seed=0)
    job = tiny_teacher_job()
    torch.manual_seed(1)
    student_dir = root / "student"
    save_model_checkpoint(build_student(job), student_dir, job.model, DiffusionConfig(4))
    results = {}
    for name, layout in LAYOUTS.items():
        parallel = ParallelConfig(**layout)
        distributed.initialize(parallel, seed=0)
        teacher = load_eval_model("teacher", teacher_dir, parallel)
        student = load_eval_model("student", student_dir, parallel)
        static = decoding.decoding_settings(student)[0]
        batch = decoding.generate_greedy(student, random_prompts(3, seed=2), static, 12, 3)
        batch = batch.batches[0]
        nll = metrics.teacher_nll(teacher, batch)
        kl = metrics.onpolicy_kl(teacher, student, batch, torch.Generator().manual_seed(5))
        results[name] = {"tokens": batch.response_tokens.tolist(), "nll": nll, "kl": kl}
    return results


@pytest.mark.distributed
def test_metrics_match_tp1_under_tp2_and_pp2(tmp_path):
    results = run_distributed(_body, world_size=2, args=(str(tmp_path),))
    for per_rank in results:
        reference = per_rank["tp1"]
        assert reference["nll"][1] > 0 and reference["kl"][1] > 0
        for name in ("tp2", "pp2"):
            got = per_rank[name]
            assert got["tokens"] == reference["tokens"], name
            assert got["nll"][1] == reference["nll"][1] and got["kl"][1] == reference["kl"][1]
            assert got["nll"][0] == pytest.approx(reference["nll"][0], rel=1e-4), name
            assert got["kl"][0] == pytest.approx(reference["kl"][0], rel=1e-4), name
    assert results[0] == results[1]  # every rank reports the same numbers (PP: broadcast)
