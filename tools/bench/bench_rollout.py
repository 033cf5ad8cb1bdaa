"""Benchmark the rollout engine against the lock-step sampler, in one run (prints a table,
writes JSON).

    python tools/bench/bench_rollout.py                        # 64 prompts, cap 48, S 8,16,32
    python tools/bench/bench_rollout.py --prompts 16 --slots 4,8 --new-tokens 32 --threads 1

SmolLM2-135M-Instruct on the CPU (converted from the bundled GGUF, untrained: its mask row is the
mean embedding; or --ckpt), the demo's rollout settings (temperature 1.0, dynamic threshold 0.9,
4 steps per block, block 4, token shift, natural EOS, a length cap), the first --prompts bundled
training prompts (chat template). Rows:
  lock-step     today's sampler (diffusion.sampler.generate), all prompts in one batch
  engine S=N    per-sequence progress, one slot per prompt
  engine S=k    per-sequence progress + continuous batching on k slots
  lock-step b=k the sampler on consecutive groups of k prompts: the same KV memory as S=k
  tokens/s, KV-cache memory (the K/V tensors: lock-step [P + R] x N columns, the engine
  [longest prompt + R] x S), tokens/forward (decoded tokens per model forward of the run).
Round cost at batch 1 (greedy, EOS ignored): CPU ms per forward of the engine's rounds (block 4,
4 queries, 8 in a block's first round: the fused commit), our AR step (block 1 + token shift =
cached AR decoding), transformers' generate step; prefill cancelled (two lengths), interleaved
--round-repeats times, medians.
PP ceiling: t(b/2) / t(b), the cost of a decode round on half the rows: the best a 2-micro-batch
pipeline (PP=2) can reach relative to whole-batch rounds (see shared notes, rollout-engine probe).
PP=2 on gloo (2 processes, tools/bench/rollout_pp2.py): the engine's whole-batch rounds vs its
pipelined rounds (--pp-microbatches; 0 = auto) on --pp-prompts prompts and --pp-slots slots: wall
ms per batch round next to the ideal measured in the same run (unpipelined = sum of the stages'
t(b), pipelined = the busiest stage's M x t(b/M)). --pp-only runs just these rows:
    python tools/bench/bench_rollout.py --pp-only --pp-prompts 4 --pp-new-tokens 8   # a check
The machine may be shared: compare rows of one run (ratios); re-measure on a quiet machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_sampler  # noqa: E402  (same directory: the SmolLM2 preparation and loaders)

BUNDLED = Path(__file__).resolve().parents[2] / "megatron_opdlm" / "data" / "bundled"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", help="Megatron checkpoint of the student (default: SmolLM2)")
    p.add_argument("--hf-dir", help="HF directory of the AR model (default: SmolLM2)")
    p.add_argument("--work-dir", default="runs/bench/smollm2", help="where SmolLM2 is converted")
    p.add_argument("--prompts", type=int, default=64, help="bundled training prompts decoded")
    p.add_argument("--slots", default="8,16,32", help="engine slot counts (continuous batching)")
    p.add_argument("--new-tokens", type=int, default=48, help="length cap (the demo's 48)")
    p.add_argument("--round-tokens", type=int, default=32, help="tokens of the batch-1 rows")
    p.add_argument("--round-repeats", type=int, default=5, help="interleaved batch-1 repeats")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench/bench_rollout.json")
    p.add_argument("--pp-prompts", type=int, default=32, help="PP=2 rows: prompts decoded")
    p.add_argument("--pp-slots", type=int, default=0, help="PP=2 rows: slots (0 = one each)")
    p.add_argument("--pp-new-tokens", type=int, default=48, help="PP=2 rows: length cap")
    p.add_argument(
        "--pp-microbatches",
        default="2,0",
        help="PP=2 rows: micro-batch counts beside whole-batch (0 = auto)",
    )
    p.add_argument("--pp-only", action="store_true", help="run only the PP=2 rows")
    p.add_argument("--no-pp", action="store_true", help="skip the PP=2 rows")
    args = p.parse_args(argv)
    if args.round_tokens < 16 or args.round_tokens % 4 or args.round_repeats < 1:
        p.error(f"--round-tokens={args.round_tokens} must be a multiple of 4, >= 16, and "
                f"--round-repeats={args.round_repeats} >= 1")  # fmt: skip
    if args.prompts < 1 or args.new_tokens < 4 or args.new_tokens % 4:
        p.error(f"--prompts={args.prompts} must be >= 1 and --new-tokens={args.new_tokens} a "
                "positive multiple of the block size 4")  # fmt: skip
    try:
        args.slot_list = [int(s) for s in args.slots.split(",") if s]
    except ValueError:
        p.error(f"--slots={args.slots!r} must be comma-separated integers, e.g. 8,16,32")
    if any(s < 1 for s in args.slot_list):
        p.error(f"--slots={args.slots!r}: every slot count must be >= 1")
    try:
        args.pp_microbatch_list = [int(m) for m in args.pp_microbatches.split(",") if m]
    except ValueError:
        p.error(f"--pp-microbatches={args.pp_microbatches!r} must be integers, e.g. 2,0")
    if any(m < 0 for m in args.pp_microbatch_list) or args.pp_prompts < 2 or args.pp_slots < 0:
        p.error(
            f"--pp-microbatches={args.pp_microbatches!r} must be >= 0 (0 = auto), "
            f"--pp-prompts={args.pp_prompts} >= 2, --pp-slots={args.pp_slots} >= 0"
        )
    if args.pp_new_tokens < 4 or args.pp_new_tokens % 4:
        p.error(f"--pp-new-tokens={args.pp_new_tokens} must be a positive multiple of 4")
    if args.pp_only and args.no_pp:
        p.error("--pp-only and --no-pp exclude each other")
    return args


def pp2_rows(args, ckpt, rollout):
    """The PP=2 rows (tools/bench/rollout_pp2.py), printed; {} with --no-pp."""
    if args.no_pp:
        return {}
    import rollout_pp2

    pp2 = rollout_pp2.run_pp2(
        ckpt, args.pp_prompts, args.pp_new_tokens, args.pp_slots, args.pp_microbatch_list,
        args.threads, args.seed, rollout,
    )  # fmt: skip
    rollout_pp2.print_pp2(pp2)
    return pp2


def load_bundled_prompts(tokenizer, job, count):
    from megatron_opdlm.data.prompts import load_prompts

    data = load_prompts(
        BUNDLED / "prompts_train.jsonl", tokenizer, vocab_size=job.model.vocab_size,
        eos_token_ids=job.model.eos_token_ids, max_prompt_length=160, chat_template=True,
    )  # fmt: skip
    return [data[i].prompt_ids for i in range(min(count, len(data)))]


def lock_step_cache_bytes(job, prompts, width):
    """K/V bytes of the sampler's static cache: layers x 2 x (P + R) x N x groups x head_dim."""
    m = job.model
    head_dim = m.hidden_size // m.num_attention_heads
    columns = max(len(p) for p in prompts) + width
    return m.num_layers * 2 * columns * len(prompts) * m.num_query_groups * head_dim * 4


def lock_step_groups(job, chunks, prompts, new_tokens, seed, group):
    """The lock-step sampler on consecutive groups of `group` prompts (memory of `group`)."""
    rows = [run_rollout(job, chunks, prompts[i : i + group], new_tokens, seed + i)
            for i in range(0, len(prompts), group)]  # fmt: skip
    keys = ("seconds", "cpu_seconds", "tokens", "forwards")
    total = {key: sum(r[key] for r in rows) for key in keys}
    return {
        **total,
        "tokens_per_s": total["tokens"] / total["seconds"],
        "tokens_per_cpu_s": total["tokens"] / total["cpu_seconds"],
        "kv_cache_mib": max(r["kv_cache_mib"] for r in rows),
        "tokens_per_forward": total["tokens"] / total["forwards"],
        "sequence_tokens_per_forward": sum(r["sequence_tokens_per_forward"] for r in rows)
        / len(rows),
    }


def run_rollout(job, chunks, prompts, new_tokens, seed, slots=None):
    """One rollout; slots None = the lock-step sampler."""
    from megatron_opdlm.diffusion.engine import generate_rollout
    from megatron_opdlm.diffusion.sampler import generate

    generator = torch.Generator().manual_seed(seed)
    stats = {}
    start, cpu_start = time.perf_counter(), time.thread_time()
    if slots is None:
        rounds = []  # the callback runs once per lock-step round (one forward each)
        batch = generate(
            chunks, prompts, job.model, job.diffusion, job.rollout, new_tokens,
            generator=generator, round_callback=lambda *a: rounds.append(1),
        )  # fmt: skip
        forwards = len(rounds) + 1  # + the prefill
        memory = lock_step_cache_bytes(job, prompts, new_tokens)
    else:
        batch = generate_rollout(
            chunks, prompts, job.model, job.diffusion, job.rollout, new_tokens,
            slots=slots, generator=generator, stats=stats,
        )  # fmt: skip
        forwards, memory = stats["forwards"], stats["kv_cache_bytes"]
    seconds, cpu_seconds = time.perf_counter() - start, time.thread_time() - cpu_start
    tokens = int(batch.response_valid.sum())
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "tokens_per_cpu_s": tokens / cpu_seconds,
        "kv_cache_mib": memory / 2**20,
        "forwards": forwards,
        "tokens_per_forward": tokens / forwards,
        "sequence_tokens_per_forward": float(
            (batch.response_lengths().float() / batch.num_forwards.clamp(min=1).float()).mean()
        ),
        "_responses": [  # kept in memory only: each sequence's tokens (compared across S)
            row[valid].tolist()
            for row, valid in zip(batch.response_tokens, batch.response_valid, strict=True)
        ],
    }


def same_sequences(reference: list[list[int]], other: list[list[int]]) -> dict:
    """How many sequences decode the same tokens in two engine runs, and where the others first
    differ (a sampled token or a threshold decision flipped by fp32 rounding of the logits: the
    batch composition changes GEMM row counts, hence kernels and summation order)."""
    first_diff = []
    for ours, theirs in zip(reference, other, strict=True):
        if ours != theirs:
            common = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                          min(len(ours), len(theirs)))  # fmt: skip
            first_diff.append(common)
    return {
        "identical_sequences": len(reference) - len(first_diff),
        "sequences": len(reference),
        "first_difference_at_token": sorted(first_diff),
    }


def ms_per_forward(job, chunks, prompts, new_tokens, diffusion, slots):
    """Greedy, EOS ignored, static 1 token per round: wall ms per model forward."""
    from megatron_opdlm.diffusion.engine import generate_rollout

    model = dataclasses.replace(job.model, eos_token_ids=[job.model.padded_vocab_size - 1])
    rollout = dataclasses.replace(
        job.rollout, temperature=0.0, remasking="static", steps_per_block=diffusion.block_size
    )
    generate_rollout(chunks, prompts, model, diffusion, rollout, diffusion.block_size)  # warm-up
    stats = {}
    start = time.thread_time()  # CPU time of this (1-thread) process: less sensitive to load
    generate_rollout(chunks, prompts, model, diffusion, rollout, new_tokens, slots=slots,
                     stats=stats)  # fmt: skip
    return 1e3 * (time.thread_time() - start) / (stats["forwards"] - stats["prefills"])


def batch1_round_costs(job, chunks, hf_model, prompt, new_tokens, repeats):
    """Round cost at batch 1: CPU ms per forward of an engine round (block 4, 4 queries; a
    block's first round also commits the previous block: 8 queries), our AR step (block 1 +
    token shift) and transformers' generate step, each the difference of a `new_tokens` and an
    8-token run over their forwards (prefill and set-up cancel), the three interleaved
    `repeats` times in this process; medians (the machine may be loaded)."""
    from megatron_opdlm.diffusion.engine import generate_rollout

    model = dataclasses.replace(job.model, eos_token_ids=[job.model.padded_vocab_size - 1])
    ids = torch.tensor([prompt])
    pad_id = hf_model.generation_config.pad_token_id or hf_model.generation_config.eos_token_id

    def ours(block_size, tokens):
        diffusion = dataclasses.replace(job.diffusion, block_size=block_size, token_shift=True)
        rollout = dataclasses.replace(
            job.rollout, temperature=0.0, remasking="static", steps_per_block=block_size
        )
        stats, start = {}, time.thread_time()
        generate_rollout(chunks, [prompt], model, diffusion, rollout, tokens, slots=1,
                         stats=stats)  # fmt: skip
        return time.thread_time() - start, stats["forwards"] - stats["prefills"]

    def theirs(tokens):
        start = time.thread_time()
        with torch.no_grad():
            out = hf_model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=pad_id,
            )  # fmt: skip
        return time.thread_time() - start, out.shape[1] - ids.shape[1]

    runs = {"round": lambda n: ours(4, n), "ar": lambda n: ours(1, n), "transformers": theirs}
    samples = {name: [] for name in runs}
    for run in runs.values():  # warm-up
        run(8)
    for _ in range(repeats):
        for name, run in runs.items():
            (long_s, long_f), (short_s, short_f) = run(new_tokens), run(8)
            samples[name].append(1e3 * (long_s - short_s) / (long_f - short_f))
    return {name: statistics.median(values) for name, values in samples.items()}, samples


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    hf_dir, ckpt = bench_sampler.prepare(args)
    demo_rollout = dict(
        temperature=1.0, remasking="dynamic", threshold=0.9, steps_per_block=4, use_kv_cache=True
    )
    if args.pp_only:
        return write_json(args, argv, {"pp2": pp2_rows(args, ckpt, demo_rollout)})
    job, chunks, tokenizer, trained = bench_sampler.load_student(ckpt)
    job.rollout = dataclasses.replace(job.rollout, **demo_rollout)
    prompts = load_bundled_prompts(tokenizer, job, args.prompts)
    n = len(prompts)
    results = []

    def add(name, row):
        results.append({"run": name, **row})
        print(f"  {name:14s} {row['tokens']:6d} tok {row['seconds']:8.2f} s "
              f"{row['tokens_per_cpu_s']:7.2f} tok/cpu-s {row['kv_cache_mib']:8.2f} MiB "
              f"{row['tokens_per_forward']:6.2f} tok/fwd", flush=True)  # fmt: skip

    run_rollout(job, chunks, prompts[:2], 8, args.seed, slots=2)  # warm-up
    add("lock-step", run_rollout(job, chunks, prompts, args.new_tokens, args.seed))
    add(f"engine S={n}", run_rollout(job, chunks, prompts, args.new_tokens, args.seed, n))
    for slots in args.slot_list:
        if slots < n:
            same = (job, chunks, prompts, args.new_tokens, args.seed, slots)
            add(f"engine S={slots}", run_rollout(*same))
            add(f"lock-step b={slots}", lock_step_groups(*same))

    # round cost at batch 1 and the PP ceiling
    block4 = dataclasses.replace(job.diffusion, block_size=4, token_shift=True)
    one = prompts[:1]
    hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    medians, round_samples = batch1_round_costs(
        job, chunks, hf_model, one[0], args.round_tokens, args.round_repeats
    )
    round_ms, ar_ms, hf_ms = medians["round"], medians["ar"], medians["transformers"]
    rows8 = (prompts * 8)[:8]
    t8 = ms_per_forward(job, chunks, rows8, args.round_tokens, block4, 8)
    t4 = ms_per_forward(job, chunks, rows8[:4], args.round_tokens, block4, 4)
    costs = {"engine_round_ms_b1": round_ms, "our_ar_step_ms_b1": ar_ms,
             "transformers_ar_step_ms_b1": hf_ms, "round_ms_b8": t8, "round_ms_b4": t4}  # fmt: skip
    rows = {r["run"]: r for r in results}
    reference = rows[f"engine S={n}"]["_responses"]
    for name, row in rows.items():  # results independent of S, up to fp32 rounding
        if name.startswith("engine") and name != f"engine S={n}":
            row["same_as_engine_S_N"] = same_sequences(reference, row["_responses"])
    for row in results:
        row.pop("_responses", None)
    lock = rows["lock-step"]
    summary = {
        f"{name}_vs_lock_step_tokens_per_cpu_s": r["tokens_per_cpu_s"] / lock["tokens_per_cpu_s"]
        for name, r in rows.items() if name.startswith("engine")
    }  # fmt: skip
    for slots in args.slot_list:  # the same KV memory: S slots vs lock-step batches of S
        if f"engine S={slots}" in rows:
            engine, lock_b = rows[f"engine S={slots}"], rows[f"lock-step b={slots}"]
            summary[f"engine_S{slots}_vs_lock_step_b{slots}_tokens_per_cpu_s"] = (
                engine["tokens_per_cpu_s"] / lock_b["tokens_per_cpu_s"]
            )
            summary[f"engine_S{slots}_vs_lock_step_b{slots}_tokens_per_forward"] = (
                engine["tokens_per_forward"] / lock_b["tokens_per_forward"]
            )
    summary.update({
        "round_vs_our_ar_step_b1": round_ms / ar_ms,
        "our_ar_step_vs_transformers_b1": ar_ms / hf_ms,
        "pp2_ideal_pipelined_vs_unpipelined": t4 / t8,
    })  # fmt: skip
    print_table(results, costs, summary)
    pp2 = pp2_rows(args, ckpt, demo_rollout)
    meta = {
        "command": "python tools/bench/bench_rollout.py " + " ".join(argv or sys.argv[1:]),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "prompts": n,
        "new_tokens": args.new_tokens,
        "round_tokens": args.round_tokens,
        "rollout": dataclasses.asdict(job.rollout),
        "block_size": job.diffusion.block_size,
        "token_shift": job.diffusion.token_shift,
        "student_trained": trained,
        "note": "shared machine under load: compare ratios of this run; re-measure quietly",
    }
    payload = {"meta": meta, "results": results, "round_costs_ms": costs, "ratios": summary,
               "round_cost_samples_ms": round_samples}  # fmt: skip
    return write_json(args, argv, {**payload, "pp2": pp2})


def write_json(args, argv, payload) -> int:
    """Write `payload` (+ the command) to --out through a temporary name."""
    payload.setdefault("meta", {})["command"] = "python tools/bench/bench_rollout.py " + " ".join(
        argv or sys.argv[1:]
    )
    payload["meta"]["pp2_settings"] = {
        "prompts": args.pp_prompts, "slots": args.pp_slots, "new_tokens": args.pp_new_tokens,
        "microbatches": args.pp_microbatch_list, "threads": args.threads,
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.rename(out)
    print(f"wrote {out}")
    return 0


def print_table(results, costs, summary):
    print("\n| run | tokens | wall s | CPU s | tokens/CPU-s | KV cache MiB | forwards | "
          "tokens/forward |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for r in results:
        print(
            f"| {r['run']} | {r['tokens']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | "
            f"{r['tokens_per_cpu_s']:.2f} | {r['kv_cache_mib']:.2f} | {r['forwards']} | "
            f"{r['tokens_per_forward']:.2f} |"
        )
    for r in results:
        if "same_as_engine_S_N" in r:
            same = r["same_as_engine_S_N"]
            print(f"{r['run']}: {same['identical_sequences']}/{same['sequences']} sequences "
                  f"identical to engine S=N; the others differ from token "
                  f"{same['first_difference_at_token']}")  # fmt: skip
    print("\n| cost (CPU ms per forward) | ms |\n|---|---|")
    for key, value in costs.items():
        print(f"| {key} | {value:.1f} |")
    print("\n| ratio | value |\n|---|---|")
    for key, value in summary.items():
        print(f"| {key} | {value:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
