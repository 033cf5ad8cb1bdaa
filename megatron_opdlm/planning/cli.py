"""`opdlm-plan` / `tools/plan.py` (see tools/plan.py for examples; docs/planning.md)."""

from __future__ import annotations

import argparse
import sys

from megatron_opdlm.planning import inputs, report
from megatron_opdlm.planning.search import Efficiency, evaluate, search


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="opdlm-plan",
        description="Peak memory per rank and phase of an OPDLM teacher + student pair, and the "
        "fastest layout that fits (exact parameter counts from the real model builder).",
    )
    inputs.add_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--json", help="write the full plan (every layout, rank, phase) here")
    out.add_argument("--show", type=int, default=15, help="layouts shown with --search (15)")
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> tuple[int, str]:
    args = parse_args(argv)
    try:
        req, model_for_tp, do_search = inputs.build_request(args)
    except ValueError as exc:
        return 2, f"plan: bad input: {exc}"
    eff = Efficiency()
    if do_search:
        cands = search(req, model_for_tp, eff)
        if not cands:
            return 2, "plan: bad input: no valid layout for this world size; check the batch sizes"
    else:
        cand = evaluate(req, eff)
        if cand.error:
            return 2, f"plan: bad input: {cand.error}"
        cands = [cand]
    lines = [report.assumptions(req, eff), "", report.candidates_table(cands, args.show), ""]
    best = cands[0]
    lines.append(f"breakdown of {report.layout_name(best)} (GiB, worst pipeline stage):")
    lines.append(report.breakdown_table(best.plan))
    if not best.fits:
        need, have = best.plan.required_bytes() / 2**30, req.gpu.memory_bytes / 2**30
        lines.append(
            f"\n{report.layout_name(best)} does NOT fit: needs {need:.1f} GiB of {have:.1f}"
        )
    if args.json:
        report.write_json(args.json, report.to_json(req, cands, eff))
    return (0 if best.fits else 1), "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    code, text = run(argv)
    print(text, file=sys.stderr if code == 2 else sys.stdout)
    return code
