"""Shared set-up for the trainer tests: tiny prompt files, tiny jobs, a saved teacher.

The teacher is a random tiny model with a large init std (0.3), so its next-token distributions
are peaked and the student (same weights, block-causal attention) starts far from it: the
distillation loss then has room to fall within a few steps.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tests.tiny import tiny_config

VOCAB = 120


def write_prompts(path: Path, count: int, seed: int = 0, responses: bool = True) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(count):
            record = {"id": f"p{i}", "prompt_ids": [rng.randrange(2, VOCAB) for _ in
                                                    range(rng.randrange(3, 9))]}  # fmt: skip
            if responses:
                length = rng.randrange(4, 14)
                record["response_ids"] = [rng.randrange(2, VOCAB) for _ in range(length)] + [1]
            f.write(json.dumps(record) + "\n")
    return path


def tiny_job(tmp_path: Path, *overrides: str, prompts: int = 32):
    """A tiny fp32 job over a generated prompt file (held-out prompts from another seed)."""
    train = tmp_path / "train.jsonl"
    held_out = tmp_path / "eval.jsonl"
    if not train.exists():
        write_prompts(train, prompts, seed=0)
        write_prompts(held_out, 8, seed=1)
    base = [
        "model.init_method_std=0.3", "model.max_position_embeddings=256",
        "rollout.max_new_tokens=16", "rollout.steps_per_block=2",
        "optim.lr=1e-2", "optim.min_lr=1e-3", "optim.warmup_steps=1",
        f"data.train_prompts={train}", "train.rollout_steps=4", "train.prompts_per_rollout=8",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.tensorboard=false",
        f"train.run_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    return tiny_config(*base, *overrides)


def save_teacher(job, directory: Path) -> Path:
    """Build the job's teacher at the current parallel layout (random weights) and save it."""
    import torch

    from megatron_opdlm.checkpoint_layout import save_model_checkpoint
    from megatron_opdlm.models.builder import build_teacher

    torch.manual_seed(job.train.seed)
    save_model_checkpoint(build_teacher(job), directory, job.model)
    return directory


def checkpoint_tensors(directory: Path) -> dict:
    """Every tensor of a torch_dist checkpoint directory, unsharded (single process, no dist)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(directory))
    metadata = reader.read_metadata()
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def assert_checkpoints_equal(first: Path, second: Path) -> None:
    """Model and optimizer tensors of two training checkpoints are bit-identical."""
    import torch

    for sub in ("model", "optimizer"):
        a, b = checkpoint_tensors(first / sub), checkpoint_tensors(second / sub)
        assert sorted(a) == sorted(b), sub
        assert a, f"no tensors in {first / sub}"
        for key in a:
            assert torch.equal(a[key], b[key]), f"{sub}: {key} differs"
