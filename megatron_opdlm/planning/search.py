"""Enumerate the valid layouts for a GPU count, keep those that fit, rank by estimated step time.

Validity is the trainer's own: `config.validate_layout` (heads, kv heads, FFN and padded vocab
divisible by TP; layers by PP x VPP; world by TP x PP) and `training.setup.check_job`'s batch
rules (global batch divisible by DP x micro-batch). TP stays within a node.

Step time of one rollout step (`estimate_step_time`), per DP rank, with stated efficiencies:
- rollout: (R / B) x steps_per_block sequential rounds (worst case: every round runs), each
  max(FLOPs / (peak x compute_eff), bytes read (weights + KV) / (HBM x memory_eff)) summed over
  the PP stages, which run one after another (rollout with PP is serial), plus 2 TP all-reduce
  latencies per layer; the prefill is compute-bound;
- teacher: 2 x matmul params x tokens + causal attention, in the student's schedule (its bubble);
- student: 3 x forward (+1 forward with full recompute), dense attention computes all S^2
  scores (FlexAttention skips masked blocks: half), with the 1F1B bubble (pp-1)/(m x vpp);
- communication: TP all-reduces (4 per layer fwd+bwd of [s, b, h]), DP gradient reduce (fp32,
  reduce-scatter + all-gather with the distributed optimizer), PP point-to-point, at
  comm_eff x link bandwidth (NVLink inside a node, the network across nodes).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from megatron_opdlm.config import validate_layout
from megatron_opdlm.planning.memory import MemoryPlan, PlanRequest, plan_memory


@dataclass(frozen=True)
class Efficiency:
    compute: float = 0.40  # fraction of peak dense FLOPs (training GEMMs, prefill)
    memory: float = 0.60  # fraction of HBM bandwidth in the memory-bound decode rounds
    comm: float = 0.70  # fraction of link bandwidth for collectives
    tp_latency_s: float = 15e-6  # one small TP all-reduce inside a node


@dataclass
class StepTime:
    rollout: float
    teacher: float
    student: float
    communication: float

    @property
    def total(self) -> float:
        return self.rollout + self.teacher + self.student + self.communication


def _layer_matmul_params(req: PlanRequest) -> int:
    m = req.job.model
    qkv = m.hidden_size * (m.num_attention_heads + 2 * m.num_query_groups) * m.kv_channels
    return (
        qkv
        + m.num_attention_heads * m.kv_channels * m.hidden_size
        + 3 * m.hidden_size * m.ffn_hidden_size
    )


def estimate_step_time(req: PlanRequest, eff: Efficiency = Efficiency()) -> StepTime:
    job, m, par, gpu = req.job, req.job.model, req.job.parallel, req.gpu
    tp, pp, dp, e = par.tp, par.pp, req.dp, req.elem
    fp8 = job.precision.fp8 != "none" and gpu.fp8_tflops > 0
    flops = (gpu.fp8_tflops if fp8 else gpu.bf16_tflops) * 1e12 * eff.compute
    hbm = gpu.hbm_gbps * 1e9 * eff.memory
    layers, p, r = m.num_layers, req.prompt_length, req.response_length
    block, spb = job.diffusion.block_size, job.rollout.steps_per_block
    attn_width = m.num_attention_heads * m.kv_channels
    lp = _layer_matmul_params(req)
    head = m.hidden_size * m.padded_vocab_size
    world = tp * pp * dp
    intra = gpu.intra_node_gbps * 1e9 * eff.comm
    inter = gpu.inter_node_gbps * 1e9 * eff.comm
    tp_bw = intra if tp <= req.gpus_per_node else inter
    dp_bw = intra if world <= req.gpus_per_node else inter

    # rollout (this DP rank's rows, all at once)
    rows = req.rollout_rows
    rounds = (r // block) * spb
    queries = block * (1 + 1 / spb)  # the fused commit adds B queries to each block's first round
    ctx = p + r / 2
    round_flops = (
        2 * (lp * layers + head) * rows * queries + 4 * layers * rows * queries * ctx * attn_width
    )
    kv_read = 2 * layers * rows * ctx * m.num_query_groups * m.kv_channels * e
    weight_read = (lp * layers + head) * e
    round_time = max(round_flops / (tp * flops), (weight_read + kv_read) / (tp * hbm))
    round_time += (2 * layers * eff.tp_latency_s) if tp > 1 else 0.0
    prefill = (2 * lp * layers * rows * p + 2 * layers * rows * p * p * attn_width) / (
        tp * pp * flops
    )
    rollout = rounds * round_time + prefill * pp  # stages serial in the prefill too

    # teacher: all rows of the rollout step, forward only, inside the student's schedule (its
    # micro-batches share the student's 1F1B bubble)
    st, ss = p + r, p + 2 * r
    vpp = par.vpp or 1
    bubble = (pp - 1) / (max(1, req.micro_batches) * vpp)
    teacher_flops = rows * (2 * lp * layers * st + 2 * layers * st * st * attn_width + 2 * head * r)
    teacher = teacher_flops / (tp * pp * flops) * (1 + bubble)

    # student: forward + backward (+ recompute)
    attn_factor = 0.5 if req.attention == "flex" else 1.0
    fwd = 2 * lp * layers * ss + 4 * layers * ss * ss * attn_width * attn_factor + 2 * head * r
    passes = 3 + (1 if req.recompute == "full" else 0)
    if req.recompute == "selective":
        passes_attn = 4 * layers * ss * ss * attn_width * attn_factor
    else:
        passes_attn = 0
    student = rows * (passes * fwd + passes_attn) / (tp * pp * flops) * (1 + bubble)

    # communication per rollout step
    steps = job.train.prompts_per_rollout // job.train.global_batch_size
    comm = 0.0
    if tp > 1:
        volume = lambda s: 2 * (tp - 1) / tp * s * m.hidden_size * e  # noqa: E731
        per_row = 4 * (layers / pp) * volume(ss) + 2 * (layers / pp) * volume(st)
        comm += rows * per_row / tp_bw
    if dp > 1:
        shard = (lp * layers + 2 * head) / (tp * pp)
        if par.use_distributed_optimizer:
            grad_bytes = (dp - 1) / dp * shard * (4 + e)
        else:
            grad_bytes = 2 * (dp - 1) / dp * shard * 4
        comm += steps * grad_bytes / dp_bw
    if pp > 1:
        comm += (
            rows
            * 2
            * (ss + st)
            * m.hidden_size
            * e
            / (inter if world > req.gpus_per_node else intra)
        )
    return StepTime(rollout=rollout, teacher=teacher, student=student, communication=comm)


@dataclass
class Candidate:
    tp: int
    pp: int
    vpp: int | None
    dp: int
    plan: MemoryPlan | None
    time: StepTime | None
    error: str | None = None  # why the layout is invalid

    @property
    def fits(self) -> bool:
        return self.plan is not None and self.plan.fits


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def with_layout(
    req: PlanRequest, tp: int, pp: int, vpp: int | None, model_for_tp=None
) -> PlanRequest:
    """A copy of `req` at another layout (the model's vocab padding redone for TP if given)."""
    job = copy.deepcopy(req.job)
    job.parallel.tp, job.parallel.pp, job.parallel.vpp = tp, pp, vpp
    if job.parallel.sequence_parallel and tp == 1:
        job.parallel.sequence_parallel = False
    if model_for_tp is not None:
        job.model = model_for_tp(tp)
    world = req.dp * req.job.parallel.tp * req.job.parallel.pp
    new = copy.copy(req)
    new.job, new.dp = job, world // (tp * pp)
    return new


def check_batch(req: PlanRequest) -> None:
    """The trainer's batch rules for this DP size (ValueError naming the values)."""
    train = req.job.train
    if train.prompts_per_rollout % train.global_batch_size:
        raise ValueError(
            f"prompts per rollout {train.prompts_per_rollout} is not a multiple of the global "
            f"batch {train.global_batch_size}"
        )
    if train.global_batch_size % (req.dp * train.micro_batch_size):
        raise ValueError(
            f"global batch {train.global_batch_size} is not divisible by DP {req.dp} x "
            f"micro-batch {train.micro_batch_size}"
        )


def evaluate(req: PlanRequest, eff: Efficiency = Efficiency()) -> Candidate:
    par = req.job.parallel
    world = req.dp * par.tp * par.pp
    try:
        validate_layout(req.job.model, par, world)
        check_batch(req)
    except ValueError as exc:
        return Candidate(par.tp, par.pp, par.vpp, req.dp, None, None, str(exc))
    return Candidate(
        par.tp, par.pp, par.vpp, req.dp, plan_memory(req), estimate_step_time(req, eff)
    )


def search(req: PlanRequest, model_for_tp=None, eff: Efficiency = Efficiency()) -> list[Candidate]:
    """Every valid (TP, PP, VPP) for the world size: fitting ones first, fastest first."""
    world = req.dp * req.job.parallel.tp * req.job.parallel.pp
    layers = req.job.model.num_layers
    out = []
    for tp in _divisors(world):
        if tp > req.gpus_per_node:
            continue
        for pp in _divisors(world // tp):
            vpps: list[int | None] = [None]
            if pp > 1:
                vpps += [v for v in (2, 3, 4) if layers % (pp * v) == 0]
            for vpp in vpps:
                cand = evaluate(with_layout(req, tp, pp, vpp, model_for_tp), eff)
                if cand.error is None:
                    out.append(cand)
    return rank(out)


def rank(candidates: list[Candidate]) -> list[Candidate]:
    return sorted(
        candidates,
        key=lambda c: (not c.fits, c.time.total if c.time else math.inf, c.pp, c.tp),
    )
