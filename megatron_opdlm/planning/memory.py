"""Peak memory per rank and per phase of one OPDLM rollout step, by component.

Phases (the trainer's order): rollout (student decodes with a KV cache), distill (one
forward-backward schedule per optimizer step in which each micro-batch runs the teacher's causal
forward over [prompt | x0], turns its projected rows into that micro-batch's targets on the last
stage, then the student's forward/backward over the packed row [prompt | x0 | x_t], S = P + 2R;
training/steps.py), optimizer step, checkpoint save. Model states (teacher weights; student
weights, gradient buffer, optimizer state) stay resident throughout; every other component lives
in its phase only. The phase peak, not the sum, decides the fit.

Allowance: a fixed CUDA context + NCCL communicators term and a fragmentation fraction of the
tensor peak (`Allowance`), stated in every report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_opdlm.config import JobConfig
from megatron_opdlm.planning import activations, params
from megatron_opdlm.planning.gpus import GIB, GPU

PHASES = ("rollout", "distill", "optimizer", "checkpoint")
RECOMPUTE = ("none", "selective", "full")
ATTENTION = ("dense", "flex")
IMPLS = ("local", "transformer_engine")


@dataclass(frozen=True)
class Allowance:
    """What no tensor count sees: CUDA context + cuBLAS workspaces + NCCL buffers, and
    fragmentation of the caching allocator (the anchors' users report ~5-15%)."""

    context_bytes: int = int(2.0 * GIB)
    fragmentation: float = 0.10


@dataclass
class PlanRequest:
    """Everything the planner needs; `job` carries the model, layout and training knobs."""

    job: JobConfig
    dp: int  # data-parallel size (world / (tp * pp))
    prompt_length: int  # P, longest prompt (data.max_prompt_length)
    response_length: int  # R, response cap (curriculum.length_max or rollout.max_new_tokens)
    gpu: GPU
    gpus_per_node: int = 8
    recompute: str = "none"  # none | selective | full
    attention: str = "dense"  # dense (unfused, arbitrary mask) | flex
    impl: str = "transformer_engine"  # activation model: transformer_engine | local
    top_k: int | None = None  # teacher targets: None = full vocabulary, else top-K
    with_teacher: bool = True  # a teacher is built (every mode but mdlm_sft without eval)
    with_rollout: bool = True  # the student rolls out (opdlm, opdlm_off)
    allowance: Allowance = field(default_factory=Allowance)

    @property
    def elem(self) -> int:
        return 4 if self.job.precision.dtype == "fp32" else 2

    @property
    def rollout_rows(self) -> int:
        """Rows the rollout engine decodes at once on one DP rank: its prompts, or fewer when
        `rollout.slots` bounds them (continuous batching; the KV cache holds the slots)."""
        prompts = self.job.train.prompts_per_rollout // self.dp
        slots = getattr(self.job.rollout, "slots", 0)
        return min(prompts, slots) if slots > 0 else prompts

    @property
    def step_rows(self) -> int:
        """Rows of one optimizer step on one DP rank (global_batch_size / dp)."""
        return self.job.train.global_batch_size // self.dp

    @property
    def micro_batches(self) -> int:
        return self.step_rows // self.job.train.micro_batch_size


@dataclass
class RankPlan:
    """Bytes by component and phase for one pipeline stage (the worst TP rank of it)."""

    pp_rank: int
    components: dict[str, int]
    phases: dict[str, dict[str, int]]  # phase -> component -> bytes (resident ones included)

    def phase_total(self, phase: str) -> int:
        return sum(self.phases[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.phase_total)

    @property
    def peak(self) -> int:
        return self.phase_total(self.peak_phase)


@dataclass
class MemoryPlan:
    request: PlanRequest
    ranks: list[RankPlan]
    student_params: int  # all ranks of one model replica
    teacher_params: int

    @property
    def worst(self) -> RankPlan:
        return max(self.ranks, key=lambda r: r.peak)

    def required_bytes(self, rank: RankPlan | None = None) -> int:
        rank = rank or self.worst
        a = self.request.allowance
        return int(rank.peak * (1 + a.fragmentation)) + a.context_bytes

    @property
    def fits(self) -> bool:
        return self.required_bytes() <= self.request.gpu.memory_bytes


def _in_flight(pp: int, vpp: int | None, pp_rank: int, micro_batches: int) -> int:
    """Micro-batch x chunk activations held at once (Megatron's 1F1B warm-up counts)."""
    if pp == 1:
        return 1
    if not vpp:
        return min(pp - pp_rank, micro_batches)
    warmup = (pp - pp_rank - 1) * 2 + (vpp - 1) * pp
    return min(warmup + 1, micro_batches * vpp)


def _shape(req: PlanRequest, seq: int) -> activations.LayerShape:
    m, par = req.job.model, req.job.parallel
    return activations.LayerShape(
        seq=seq, batch=req.job.train.micro_batch_size, hidden=m.hidden_size,
        heads=m.num_attention_heads, groups=m.num_query_groups, head_dim=m.kv_channels,
        ffn=m.ffn_hidden_size, tp=par.tp, sequence_parallel=par.sequence_parallel, elem=req.elem,
    )  # fmt: skip


def student_activation_bytes(req: PlanRequest, count: params.RankCount, pp_rank: int) -> int:
    """Saved-for-backward bytes of ONE student micro-batch forward on this stage (all chunks)."""
    p, r = req.prompt_length, req.response_length
    seq = p + 2 * r
    shape = _shape(req, seq)
    total = count.layers * activations.layer_saved_bytes(
        shape, req.impl, req.attention, req.recompute
    )
    total += len(count.chunks) * activations.chunk_saved_bytes(shape, req.recompute)
    b = req.job.train.micro_batch_size
    if req.attention == "dense" or req.impl == "local":
        total += b * seq * seq  # the [b, 1, S, S] bool mask every layer reads
    if any(c.has_embedding for c in count.chunks):
        total += activations.embedding_saved_bytes(seq, b)
    if pp_rank == req.job.parallel.pp - 1:
        projects = not req.job.parallel.sequence_parallel
        total += activations.final_norm_and_head_bytes(shape, req.impl, r, projects)
    return total


def kv_cache_bytes(req: PlanRequest, layers: int, rows: int | None = None) -> int:
    """BlockKVCache: K and V [P + R, b, g/tp, d] per layer of this stage, model dtype."""
    m = req.job.model
    rows = req.rollout_rows if rows is None else rows
    per_layer = 2 * (req.prompt_length + req.response_length) * rows
    return (
        per_layer * (m.num_query_groups // req.job.parallel.tp) * m.kv_channels * req.elem * layers
    )


def _logit_bytes(req: PlanRequest, rows: int, columns: int, per_elem: int) -> int:
    vocab_shard = req.job.model.padded_vocab_size // req.job.parallel.tp
    return rows * columns * vocab_shard * per_elem


# Teacher targets alive at once on the last stage: its micro-batches in flight between forward
# and backward. 1F1B and the interleaved schedule both run the last stage's backward of a
# micro-batch right after its forward (tests/distributed/test_fused_step.py counts them).
TARGETS_IN_FLIGHT = 1


def _targets_held(req: PlanRequest) -> int:
    """Teacher targets of the micro-batches in flight on the last stage (training/steps.py makes
    and reads them per micro-batch inside the student's schedule): full vocabulary fp32
    [mbs, R, V/tp], or top-K fp32 values + int64 ids."""
    rows = req.job.train.micro_batch_size * TARGETS_IN_FLIGHT
    if req.top_k is None:
        return _logit_bytes(req, rows, req.response_length, 4)
    return rows * req.response_length * req.top_k * (4 + 8)


def _packed_masks(req: PlanRequest) -> int:
    """packing.py builds dense bool masks for every row of the step: student [S, S], teacher
    [P+R, P+R] (whatever attention backend consumes them)."""
    p, r = req.prompt_length, req.response_length
    return req.step_rows * ((p + 2 * r) ** 2 + (p + r) ** 2)


def _no_grad_layer_bytes(req: PlanRequest, rows: int, seq: int, queries: int) -> int:
    """Transient of one layer in a no-grad forward: projections, MLP and (dense) scores."""
    m, tp, e = req.job.model, req.job.parallel.tp, req.elem
    width = (m.num_attention_heads + 2 * m.num_query_groups) * m.kv_channels // tp
    linear = rows * queries * (2 * m.hidden_size + width + 3 * m.ffn_hidden_size // tp) * e
    scores = 0
    if req.attention == "dense" or req.impl == "local":
        scores = rows * (m.num_attention_heads // tp) * queries * seq * (4 + e)
    return linear + scores


def plan_memory(req: PlanRequest) -> MemoryPlan:
    job, par = req.job, req.job.parallel
    student = params.rank_counts(job, "student")
    teacher = params.rank_counts(job, "teacher")
    fp8 = job.precision.fp8 != "none"
    p, r, e = req.prompt_length, req.response_length, req.elem
    block = job.diffusion.block_size
    mbs = job.train.micro_batch_size
    seq_student, seq_teacher = p + 2 * r, p + r
    vocab = job.model.padded_vocab_size
    ranks = []
    for pp_rank in range(par.pp):
        tp_ranks = [student[(t, pp_rank)] for t in range(par.tp)]
        s_count = max(tp_ranks, key=lambda c: c.params)
        t_count = max((teacher[(t, pp_rank)] for t in range(par.tp)), key=lambda c: c.params)
        state = params.student_state_bytes(job, req.dp, s_count.tp_rank, pp_rank)
        last = pp_rank == par.pp - 1
        # FP8 (TE): an FP8 copy of each weight is cached next to the high-precision one
        teacher_w = t_count.params * (e + (1 if fp8 else 0)) if req.with_teacher else 0
        resident = {
            "teacher_weights": teacher_w,
            "student_weights": state.weights + (s_count.params if fp8 else 0),
            "grads": state.grads,
            "optimizer_state": state.optimizer,
        }
        act_one = student_activation_bytes(req, s_count, pp_rank)
        in_flight = _in_flight(par.pp, par.vpp, pp_rank, req.micro_batches)
        per_chunk_act = act_one // max(1, len(s_count.chunks))
        shape = _shape(req, seq_student)
        # one p2p activation tensor: the teacher's and the student's hidden states, concatenated
        seq_boundary = seq_student + (seq_teacher if req.with_teacher else 0)
        boundary = e * seq_boundary * mbs * job.model.hidden_size
        # p2p send/recv of stage boundaries; Megatron's global buffer for the SP all-gather
        comm = (2 * boundary if par.pp > 1 else 0) + (boundary if par.sequence_parallel else 0)
        kv = kv_cache_bytes(req, s_count.layers) if req.with_rollout else 0
        rows = req.rollout_rows
        sampler = rows * 2 * block * vocab * 4 * 3 if last else 0  # gathered logits, probs
        prefill = _no_grad_layer_bytes(req, rows, p, p) if req.with_rollout else 0
        sampler = sampler if req.with_rollout else 0
        held = _targets_held(req) if last and req.with_teacher else 0
        masks = _packed_masks(req)
        teacher_logits = _logit_bytes(req, mbs, r + 1, e + 8) if last else 0
        student_logits = 0
        if last:
            cols = r if not par.sequence_parallel else seq_student
            student_logits = _logit_bytes(req, mbs, cols, e + (12 if req.top_k else 16))
        working = activations.layer_working_bytes(shape, req.impl, req.attention, req.recompute)
        teacher_transient = 0
        if req.with_teacher:
            teacher_transient = _no_grad_layer_bytes(req, mbs, seq_teacher, seq_teacher)
        else:
            teacher_logits = 0
        stored = per_chunk_act * in_flight if par.vpp else act_one * in_flight
        owned = state.adam_moments // 8  # optimizer elements on this rank
        # torch's foreach Adam (no TE/Apex) materialises the fp32 denominator of the update;
        # Transformer Engine's / Apex's fused multi-tensor Adam does not
        adam_temporaries = 4 * owned if req.impl == "local" else 0
        save_gather = 0
        if par.use_distributed_optimizer and req.dp > 1:
            # fully_reshardable save: the DP-sharded optimizer state is all-gathered on GPU
            save_gather = state.optimizer * (req.dp - 1)
        phases = {
            "rollout": {**resident, "kv_cache": kv, "prefill_transient": prefill,
                        "sampler_logits": sampler},
            # One schedule: a micro-batch's no-grad teacher forward, its targets, the student's
            # forward and backward, on top of the activations of the micro-batches in flight.
            # The teacher's transients and the student's backward alternate; summed (a bound).
            "distill": {**resident, "packed_masks": masks, "teacher_targets": held,
                        "teacher_forward_transient": teacher_transient,
                        "teacher_logits": teacher_logits, "activations": stored,
                        "backward_working_set": working,
                        "student_logits_softmax_grads": student_logits, "comm_buffers": comm},
            "optimizer": {**resident, "optimizer_temporaries": adam_temporaries},
            "checkpoint": {**resident, "checkpoint_gather": save_gather},
        }  # fmt: skip
        components = {name: max(ph.get(name, 0) for ph in phases.values())
                      for name in {k for ph in phases.values() for k in ph}}  # fmt: skip
        components["activations_per_micro_batch"] = act_one
        components["in_flight_micro_batches"] = in_flight
        ranks.append(RankPlan(pp_rank=pp_rank, components=components, phases=phases))
    student_total = sum(c.params for c in student.values())
    teacher_total = sum(c.params for c in teacher.values())
    return MemoryPlan(req, ranks, student_total, teacher_total)


def gib(nbytes: int) -> float:
    return nbytes / GIB
