"""The PP=2 rows of bench_rollout.py: pipelined vs whole-batch rollout rounds on 2 gloo processes.

Each of the 2 spawned ranks builds the student at PP=2 (its half of the layers, the checkpoint
resharded on load), decodes the same prompts once per micro-batch setting (1 = whole-batch
rounds, the baseline; M >= 2 pipelined; 0 = auto) and reports, per batch round (a whole-batch
round or a pipelined cycle: every live slot decides once), its wall time and its own busy time
(wall minus time in communication, prefills excluded; `diffusion.engine_pipeline`). The ideal is
computed from the same run: unpipelined = sum over stages of t(b), pipelined = the busiest
stage's M x t(b/M), t = a stage's median busy time per batch round.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

WHOLE, PIPELINED = "whole-batch", "pipelined"


def _median(values):
    """Median without the first batch round (warm-up: cache allocation, pipeline fill)."""
    values = values[1:] or values
    return statistics.median(values) if values else float("nan")


def _worker(rank, world, port, settings, out_dir):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(settings["threads"])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_rollout

    from megatron_opdlm.checkpoint_layout import (
        TOKENIZER_DIR,
        load_model_checkpoint,
        read_model_meta,
        resolve_checkpoint_dir,
    )  # fmt: skip
    from megatron_opdlm.config import DiffusionConfig, JobConfig, ParallelConfig, PrecisionConfig
    from megatron_opdlm.data.tokenizer import load_tokenizer
    from megatron_opdlm.diffusion.engine import generate_rollout
    from megatron_opdlm.models.builder import build_student
    from megatron_opdlm.models.vocab import init_mask_token_row
    from megatron_opdlm.runtime import collectives, distributed

    ckpt = resolve_checkpoint_dir(settings["ckpt"])
    model_cfg, trained = read_model_meta(ckpt)
    job = JobConfig(
        model=model_cfg, diffusion=trained or DiffusionConfig(token_shift=True),
        precision=PrecisionConfig(transformer_impl="local"), parallel=ParallelConfig(pp=2),
    )  # fmt: skip
    job.validate(world)
    distributed.initialize(job.parallel, seed=1234)
    chunks = build_student(job)
    load_model_checkpoint(chunks, ckpt)
    if trained is None:
        init_mask_token_row(chunks, model_cfg)
    job.rollout = dataclasses.replace(job.rollout, **settings["rollout"])
    prompts = bench_rollout.load_bundled_prompts(
        load_tokenizer(Path(ckpt) / TOKENIZER_DIR), job, settings["prompts"]
    )

    def rollout(microbatches, new_tokens, slots):
        stats = {}
        config = dataclasses.replace(job.rollout, pipeline_microbatches=microbatches)
        collectives.barrier()
        start = time.perf_counter()
        batch = generate_rollout(
            chunks, prompts, job.model, job.diffusion, config, new_tokens, slots=slots,
            generator=torch.Generator().manual_seed(settings["seed"]), stats=stats,
        )  # fmt: skip
        collectives.barrier()
        return time.perf_counter() - start, int(batch.response_valid.sum()), stats

    rollout(1, 8, 2)  # warm-up
    runs = []
    for microbatches in settings["microbatches"]:
        seconds, tokens, stats = rollout(microbatches, settings["new_tokens"], settings["slots"])
        runs.append({
            "microbatches": microbatches, "seconds": seconds, "tokens": tokens,
            **{key: stats[key] for key in (
                "batch_rounds", "rounds", "pipeline_microbatches", "pipeline_reason",
                "pipeline_ideal_gain", "round_wall_s", "round_busy_s",
            )},
        })  # fmt: skip
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"prompts": len(prompts), "runs": runs}, f)
    distributed.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pp2(ckpt, prompts, new_tokens, slots, microbatches, threads, seed, rollout) -> dict:
    """Spawn the 2 ranks, collect their reports, compute the rows (see the module docstring)."""
    settings = {
        "ckpt": str(ckpt), "prompts": prompts, "new_tokens": new_tokens, "slots": slots,
        "microbatches": [1, *[m for m in microbatches if m != 1]], "threads": threads,
        "seed": seed, "rollout": rollout,
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-pp2-") as out_dir:
        mp.start_processes(
            _worker, args=(2, _free_port(), settings, out_dir), nprocs=2, start_method="spawn"
        )
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(2)]
    return {**summarize(ranks), "per_rank": ranks}  # per_rank: every batch round's seconds


def summarize(ranks: list[dict]) -> dict:
    """Rows per micro-batch setting: wall per batch round (the slower rank's median), stage
    costs and the ideal of the same run."""
    baseline = [r["runs"][0] for r in ranks]
    t_whole = [_median(run["round_busy_s"][WHOLE]) for run in baseline]  # t(b) per stage
    unpipelined_ideal = sum(t_whole)
    base_ms = 1e3 * max(_median(run["round_wall_s"][WHOLE]) for run in baseline)
    rows = []
    for index, run in enumerate(ranks[0]["runs"]):
        per_rank = [r["runs"][index] for r in ranks]
        mode = PIPELINED if run["pipeline_microbatches"] > 1 else WHOLE
        walls = [_median(r["round_wall_s"][mode]) for r in per_rank]
        row = {
            "run": "whole-batch (M=1)" if run["microbatches"] == 1 else
                   f"pipelined M={run['microbatches'] or 'auto'}",
            "microbatches_used": run["pipeline_microbatches"],
            "reason": run["pipeline_reason"],
            "seconds": max(r["seconds"] for r in per_rank),
            "tokens": run["tokens"],
            "batch_rounds": run["batch_rounds"],
            "ms_per_round": 1e3 * max(walls),
            "stage_busy_ms_per_round": [1e3 * _median(r["round_busy_s"][mode]) for r in per_rank],
            "auto_ideal_gain": run["pipeline_ideal_gain"],
        }  # fmt: skip
        if mode == WHOLE:
            row["ideal_ms_per_round"] = 1e3 * unpipelined_ideal
        else:
            row["ideal_ms_per_round"] = max(row["stage_busy_ms_per_round"])
        row["vs_whole_batch"] = row["ms_per_round"] / base_ms
        row["vs_ideal"] = row["ms_per_round"] / row["ideal_ms_per_round"]
        rows.append(row)
    return {
        "prompts": ranks[0]["prompts"],
        "stage_t_b_ms": [1e3 * t for t in t_whole],
        "rows": rows,
    }


def print_pp2(pp2: dict) -> None:
    print(
        f"\nPP=2 on gloo (2 processes), {pp2['prompts']} prompts; t(b) per stage "
        + ", ".join(f"{t:.1f}" for t in pp2["stage_t_b_ms"])
        + " ms\n| run | M used | wall s | batch rounds | ms/round | ideal ms/round | "
        "stage busy ms/round | vs whole-batch | vs ideal |\n|---|---|---|---|---|---|---|---|---|"
    )
    for r in pp2["rows"]:
        busy = " / ".join(f"{b:.1f}" for b in r["stage_busy_ms_per_round"])
        print(
            f"| {r['run']} | {r['microbatches_used']} | {r['seconds']:.2f} | {r['batch_rounds']} "
            f"| {r['ms_per_round']:.1f} | {r['ideal_ms_per_round']:.1f} | {busy} | "
            f"{r['vs_whole_batch']:.2f}x | {r['vs_ideal']:.2f}x |"
        )
    for r in pp2["rows"]:
        if r["auto_ideal_gain"] is not None:
            print(f"auto: {r['reason']}")
