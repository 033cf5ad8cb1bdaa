"""Few-row linear layers on CPU: megatron's x @ W^T vs W @ x^T (cpu_compat.small_row_linears).

    python tools/bench/bench_small_row_linear.py [--rows 1,3,4,5,8,9,16,32] [--threads 1]

Times all the projections of one SmolLM2-135M forward (per layer QKV 960x576, out 576x576,
gated fc1 3072x576, fc2 576x1536; 30 layers; vocabulary head 49280x576; fp32, random weights)
for a few query rows, both ways, alternating within this one run (best of --repeats). The
sampler's rounds have 3-8 rows at batch 1 (a block of 4 tokens, 8 with a fused commit), which is
why SMALL_ROWS is where the two cross. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in)
HEAD_SHAPE = (49280, 576)


def one_forward(weights, inputs, weight_first: bool) -> float:
    start = time.perf_counter()
    for weight in weights:
        x = inputs[weight.shape[1]]  # [m, in]
        if weight_first:
            torch.mm(weight, x.t()).t().contiguous()  # what small_row_linears does
        else:
            F.linear(x, weight)  # megatron's torch.matmul(x, weight.t())
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", default="1,3,4,5,8,9,16,32")
    p.add_argument("--threads", type=int, default=1, help="as tools/bench/bench_sampler.py")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default="runs/bench/bench_small_row_linear.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = [torch.randn(shape) for shape in LAYER_SHAPES * 30 + [HEAD_SHAPE]]
    results = []
    print("| rows | x @ W^T ms | W @ x^T ms | speed-up |\n|---|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        inputs = {width: torch.randn(rows, width) for width in (576, 1536)}
        one_forward(weights, inputs, True), one_forward(weights, inputs, False)  # warm-up
        times = {True: [], False: []}
        for _ in range(args.repeats):
            for weight_first in (False, True):
                times[weight_first].append(one_forward(weights, inputs, weight_first))
        row = {"rows": rows, "x_wt_ms": 1e3 * min(times[False]), "w_xt_ms": 1e3 * min(times[True])}
        row["speedup"] = row["x_wt_ms"] / row["w_xt_ms"]
        results.append(row)
        print(f"| {rows} | {row['x_wt_ms']:.1f} | {row['w_xt_ms']:.1f} | {row['speedup']:.2f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    meta = {"threads": args.threads, "torch": torch.__version__, "repeats": args.repeats}
    tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    tmp.rename(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
