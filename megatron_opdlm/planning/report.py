"""Planner output: a fixed-width table for people, JSON for tools."""

from __future__ import annotations

import json
from dataclasses import asdict

from megatron_opdlm.planning.memory import PHASES, MemoryPlan, PlanRequest
from megatron_opdlm.planning.search import Candidate, Efficiency

GIB = 2**30


def _gb(nbytes: int) -> str:
    return f"{nbytes / GIB:.1f}"


def assumptions(req: PlanRequest, eff: Efficiency) -> str:
    job, a = req.job, req.allowance
    topk = f"top-{req.top_k}" if req.top_k else "full-vocab"
    return (
        f"model: {job.model.num_layers} layers, h={job.model.hidden_size}, "
        f"heads={job.model.num_attention_heads}/{job.model.num_query_groups} kv, "
        f"ffn={job.model.ffn_hidden_size}, vocab={job.model.padded_vocab_size} (padded), "
        f"tied={job.model.tie_word_embeddings}\n"
        f"workload: {job.train.prompts_per_rollout} prompts/rollout step, prompt "
        f"{req.prompt_length} + response {req.response_length} (student row "
        f"{req.prompt_length + 2 * req.response_length}),"
        f" block {job.diffusion.block_size}, global batch {job.train.global_batch_size}, "
        f"micro-batch {job.train.micro_batch_size}, {topk} teacher targets\n"
        f"numerics: {job.precision.dtype}, fp8={job.precision.fp8}, recompute={req.recompute}, "
        f"attention={req.attention}, activations modelled for {req.impl}, "
        f"SP={job.parallel.sequence_parallel}, distributed optimizer="
        f"{job.parallel.use_distributed_optimizer}\n"
        f"GPU: {req.gpu.name}, {_gb(req.gpu.memory_bytes)} GiB; allowance "
        f"{_gb(a.context_bytes)} GiB context/NCCL + {a.fragmentation:.0%} fragmentation\n"
        f"step-time model: {eff.compute:.0%} of peak FLOPs, {eff.memory:.0%} of HBM bandwidth "
        f"(decode), {eff.comm:.0%} of link bandwidth, {eff.tp_latency_s * 1e6:.0f} us per decode "
        "TP all-reduce; rollout assumes every denoising round runs"
    )


def layout_name(c: Candidate) -> str:
    vpp = f"xVPP{c.vpp}" if c.vpp else ""
    return f"TP{c.tp}xPP{c.pp}{vpp}xDP{c.dp}"


def candidates_table(cands: list[Candidate], limit: int | None = None) -> str:
    phases = " ".join(f"{p[:9]:>9}" for p in PHASES)
    head = f"{'layout':<20} {'fits':<4} {'need GiB':>8} {'peak phase':<11} {phases}"
    head += f" {'step s':>8} {'rollout':>8}"
    lines = [head, "-" * len(head)]
    for c in cands[:limit] if limit else cands:
        plan, worst = c.plan, c.plan.worst
        phases = " ".join(f"{_gb(worst.phase_total(p)):>9}" for p in PHASES)
        lines.append(
            f"{layout_name(c):<20} {'yes' if plan.fits else 'NO':<4} "
            f"{_gb(plan.required_bytes()):>8} {worst.peak_phase:<11} {phases} "
            f"{c.time.total:>8.0f} {c.time.rollout:>8.0f}"
        )
    return "\n".join(lines)


def breakdown_table(plan: MemoryPlan) -> str:
    """Components (rows) x phases (columns), GiB, for the worst pipeline stage."""
    worst = plan.worst
    names = sorted({k for ph in worst.phases.values() for k in ph},
                   key=lambda n: -max(ph.get(n, 0) for ph in worst.phases.values()))  # fmt: skip
    head = f"{'component (stage ' + str(worst.pp_rank) + ')':<30}" + "".join(
        f"{p:>11}" for p in PHASES
    )
    lines = [head, "-" * len(head)]
    for name in names:
        cells = "".join(
            f"{_gb(worst.phases[p][name]) if name in worst.phases[p] else '-':>11}" for p in PHASES
        )
        lines.append(f"{name:<30}{cells}")
    lines.append(f"{'total':<30}" + "".join(f"{_gb(worst.phase_total(p)):>11}" for p in PHASES))
    return "\n".join(lines)


def to_json(req: PlanRequest, cands: list[Candidate], eff: Efficiency) -> dict:
    def cand(c: Candidate) -> dict:
        plan = c.plan
        return {
            "layout": layout_name(c), "tp": c.tp, "pp": c.pp, "vpp": c.vpp, "dp": c.dp,
            "fits": plan.fits, "required_bytes": plan.required_bytes(),
            "gpu_memory_bytes": req.gpu.memory_bytes,
            "student_params": plan.student_params, "teacher_params": plan.teacher_params,
            "step_time_s": {**asdict(c.time), "total": c.time.total},
            "ranks": [
                {"pp_rank": r.pp_rank, "peak_phase": r.peak_phase, "peak_bytes": r.peak,
                 "required_bytes": plan.required_bytes(r), "phases": r.phases}
                for r in plan.ranks
            ],
        }  # fmt: skip

    return {
        "assumptions": assumptions(req, eff).split("\n"),
        "efficiency": asdict(eff),
        "allowance": asdict(req.allowance),
        "gpu": asdict(req.gpu),
        "candidates": [cand(c) for c in cands],
    }


def write_json(path: str, payload: dict) -> None:
    import os

    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
