"""Few-row linear layers on CPU: megatron's x @ W^T vs W @ x^T vs oneDNN's linear
(cpu_compat.small_row_linears picks by row count: WEIGHT_FIRST_ROWS, SMALL_ROWS).

    python tools/bench/bench_small_row_linear.py [--rows 1,3,4,5,8,9,16,32] [--threads 1]

Times all the projections of one SmolLM2-135M forward (per layer QKV 960x576, out 576x576,
gated fc1 3072x576, fc2 576x1536; 30 layers; vocabulary head 49280x576; fp32, random weights)
for a few query rows, each way, alternating within this one run (best of --repeats; oneDNN only
where torch has it). The sampler's rounds have 3-8 rows at batch 1 (a block of 4 tokens, 8 with a
fused commit). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_opdlm.runtime import cpu_compat

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in)
HEAD_SHAPE = (49280, 576)


KINDS = ("x_wt", "w_xt", "onednn")


def one_forward(weights, inputs, kind: str) -> float:
    start = time.perf_counter()
    for weight in weights:
        x = inputs[weight.shape[1]]  # [m, in]
        if kind == "w_xt":
            torch.mm(weight, x.t()).t().contiguous()  # small_row_linears up to 4 rows
        elif kind == "onednn":
            cpu_compat._onednn_linear(x, weight)  # small_row_linears at 5-8 rows
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
    kinds = KINDS if cpu_compat.onednn_linear_available() else KINDS[:2]
    results = []
    print("| rows | x @ W^T ms | W @ x^T ms | oneDNN ms |\n|---|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        inputs = {width: torch.randn(rows, width) for width in (576, 1536)}
        for kind in kinds:  # warm-up
            one_forward(weights, inputs, kind)
        times = {kind: [] for kind in kinds}
        for _ in range(args.repeats):
            for kind in kinds:
                times[kind].append(one_forward(weights, inputs, kind))
        row = {"rows": rows, **{f"{kind}_ms": 1e3 * min(times[kind]) for kind in kinds}}
        results.append(row)
        onednn = f"{row['onednn_ms']:.1f}" if "onednn_ms" in row else "-"
        print(f"| {rows} | {row['x_wt_ms']:.1f} | {row['w_xt_ms']:.1f} | {onednn} |")
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
