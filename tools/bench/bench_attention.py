"""Benchmark: the student's attention on packed rows [prompt | x0 | x_t], dense vs FlexAttention.

For each row length S (packed rows S = P + 2R with the paper's shapes up to P = 1024, R = 4000):
- dense: the [b, 1, S, S] mask from the predicates plus megatron's DotProductAttention math
  (GQA repeat, baddbmm scores [b*h, S, S] fp32, masked_fill -10000, softmax, bmm);
- flex: the block mask from the column descriptor (`models.block_masks`) plus compiled
  flex_attention (`models.flex_attention.attention`, lengths padded to their bucket).
CPU: forward without grad. CUDA (when present): forward + backward.
Also the block-mask build time with a cold structure cache and with a warm one (the bucket cache),
and the dense mask's build time. All figures of one run; compare them as ratios.

Peak memory, CPU: torch.profiler(profile_memory=True) records every allocation and free of
torch's CPU allocator (which tracemalloc does not see); the peak is the maximum running sum of
those events during the measured call (bytes above what was live before it). CUDA:
torch.cuda.max_memory_allocated over the call.

    OMP_NUM_THREADS=1 python tools/bench/bench_attention.py --out docs/bench_attention/cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch


def _fail(message: str) -> None:
    print(f"bench_attention: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="1024,2048,4096,9024", help="row lengths S")
    parser.add_argument("--heads", type=int, default=2, help="query heads (per TP rank)")
    parser.add_argument("--groups", type=int, default=1, help="key/value groups (GQA)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    try:
        args.lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        _fail(f"--lengths {args.lengths!r} must be comma-separated integers, e.g. 1024,2048")
    if any(s < 16 for s in args.lengths):
        _fail(f"--lengths {args.lengths}: every length must be >= 16")
    if args.heads % args.groups:
        _fail(f"--heads {args.heads} must be a multiple of --groups {args.groups}")
    return args


def row_shape(length: int, block: int) -> tuple[int, int]:
    """(P, R) with P + 2R = length: the paper's P = 1024 once S allows, R a block multiple."""
    prompt = min(1024, length // 4)
    response = (length - prompt) // 2 // block * block
    return length - 2 * response, response


def ragged_valid(batch: int, prompt: int, response: int) -> torch.Tensor:
    """[b, P + 2R]: row i left-padded by 7i columns, its response ending 3 tokens into a block."""
    cols_p, cols_r = torch.arange(prompt), torch.arange(response)
    rows = []
    for i in range(batch):
        end = response - 4 * i - 1 if i else response
        r_valid = cols_r < end
        rows.append(torch.cat([cols_p >= 7 * i, r_valid, r_valid]))
    return torch.stack(rows)


def dense_attention(q, k, v, mask):  # q [b, h, s, d], k/v [b, g, s, d], mask [b, 1, s, s]
    """megatron DotProductAttention's math (local spec, unfused softmax)."""
    b, h, s, d = q.shape
    rep = h // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.baddbmm(
        torch.empty(b * h, s, s, dtype=q.dtype, device=q.device),
        q.reshape(b * h, s, d), k.reshape(b * h, s, d).transpose(1, 2),
        beta=0.0, alpha=d**-0.5,
    ).view(b, h, s, s)  # fmt: skip
    probs = torch.softmax(scores.masked_fill(mask, -10000.0), dim=-1)
    return torch.bmm(probs.view(b * h, s, s), v.reshape(b * h, s, d)).view(b, h, s, d)


def measure(fn, device) -> tuple[float, int, object]:
    """(seconds, peak bytes above the starting level, result) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() - base, out
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return seconds, peak, out


def run_length(length: int, args, device, results: list) -> None:
    from megatron_opdlm.models import block_masks
    from megatron_opdlm.models import flex_attention as fa
    from megatron_opdlm.models import mask_functions as mf

    p, r = row_shape(length, args.block_size)
    valid = ragged_valid(args.batch, p, r).to(device)
    columns, _ = mf.packed_row_columns(p, r, args.block_size, valid)  # [b, 3, S]
    g = torch.Generator(device="cpu").manual_seed(length)
    shape_q = (args.batch, args.heads, length, args.head_dim)
    shape_kv = (args.batch, args.groups, length, args.head_dim)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    grad = device.type == "cuda"
    q = torch.randn(shape_q, generator=g).to(device, dtype).requires_grad_(grad)
    k = torch.randn(shape_kv, generator=g).to(device, dtype).requires_grad_(grad)
    v = torch.randn(shape_kv, generator=g).to(device, dtype).requires_grad_(grad)

    def dense_step():
        with torch.set_grad_enabled(grad):
            out = dense_attention(q, k, v, mf.dense_mask(columns))
            if grad:
                out.float().square().mean().backward()
        return out.detach()

    def flex_step():
        fa.FORWARD_MASKS.entries.clear()  # a new batch: its block mask is built in the call
        with torch.set_grad_enabled(grad):
            out = fa.attention(q, k, v, columns, compile=True)
            if grad:
                out.float().square().mean().backward()
        return out.detach()

    def cold_build():
        block_masks.STRUCTURES.clear()
        return block_masks.build_block_mask(columns, length)

    compile_start = time.perf_counter()
    flex_step()  # compile (first length) / recompile (dynamic shapes), warm the cache
    compile_s = time.perf_counter() - compile_start
    dense_step()  # warm-up
    dense_s, dense_peak, dense_out = measure(dense_step, device)
    flex_s, flex_peak, flex_out = measure(flex_step, device)
    diff = float((dense_out.float() - flex_out.float()).abs().max())
    mask_s, mask_peak, _ = measure(lambda: mf.dense_mask(columns), device)
    cold_s, cold_peak, _ = measure(cold_build, device)
    warm_s, _, _ = measure(lambda: block_masks.build_block_mask(columns, length), device)
    row = {
        "S": length, "P": p, "R": r, "padded_S": block_masks.bucket_length(length),
        "dense_s": dense_s, "dense_peak_bytes": dense_peak,
        "flex_s": flex_s, "flex_peak_bytes": flex_peak,
        "flex_over_dense_time": flex_s / dense_s, "flex_over_dense_peak": flex_peak / dense_peak,
        "max_abs_diff": diff, "flex_first_call_s": compile_s,
        "dense_mask_build_s": mask_s, "dense_mask_peak_bytes": mask_peak,
        "block_mask_build_cold_s": cold_s, "block_mask_build_cold_peak_bytes": cold_peak,
        "block_mask_build_cached_s": warm_s,
    }  # fmt: skip
    results.append(row)
    mib = 2**20
    print(
        f"{length:>6} {dense_s:8.3f} {flex_s:8.3f} {flex_s / dense_s:6.2f} "
        f"{dense_peak / mib:9.1f} {flex_peak / mib:9.1f} {flex_peak / dense_peak:7.4f} "
        f"{mask_s * 1e3:8.1f} {cold_s * 1e3:9.1f} {warm_s * 1e3:9.1f} {diff:8.1e}",
        flush=True,
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    from megatron_opdlm.models import flex_attention as fa

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        fa.prepare_cpu_compile()
    print(
        f"{'S':>6} {'dense s':>8} {'flex s':>8} {'ratio':>6} {'dense MiB':>9} {'flex MiB':>9} "
        f"{'peak x':>7} {'mask ms':>8} {'bm cold':>9} {'bm cached':>9} {'max|d|':>8}"
    )
    results: list = []
    start = time.perf_counter()
    for length in args.lengths:
        run_length(length, args, device, results)
    last = results[-1]
    criterion = {
        "rule": "CPU: compiled flex forward peak at the longest S <= 1/10 of dense",
        "S": last["S"],
        "ratio": last["flex_over_dense_peak"],
        "met": last["flex_over_dense_peak"] <= 0.1,
    }
    print(f"criterion: {criterion}")
    report = {
        "command": "OMP_NUM_THREADS=1 python tools/bench/bench_attention.py " + " ".join(
            sys.argv[1:] if argv is None else argv
        ),
        "device": device.type, "torch": torch.__version__, "platform": platform.platform(),
        "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "batch": args.batch, "heads": args.heads, "groups": args.groups,
        "head_dim": args.head_dim, "block_size": args.block_size,
        "dtype": "bf16" if device.type == "cuda" else "fp32",
        "pass": "forward + backward" if device.type == "cuda" else "forward, no grad",
        "memory_method": (
            "CUDA: torch.cuda.max_memory_allocated minus the level before the call. CPU: "
            "torch.profiler(profile_memory=True) allocation/free events of torch's CPU "
            "allocator during the call, peak of their running sum (tracemalloc cannot see torch "
            "allocations). Dense includes its mask build; flex includes its block-mask build."
        ),
        "notes": "shared 2-core machine under load: compare within this run (ratios)",
        "total_s": time.perf_counter() - start, "criterion": criterion, "rows": results,
    }  # fmt: skip
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
