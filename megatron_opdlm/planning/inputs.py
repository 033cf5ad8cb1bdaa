"""Planner inputs: a job YAML (the trainer's config) or an HF config.json, plus knobs.

Every knob left unset keeps the job's value (YAML) or the paper's setting (HF config: 128 prompts
per rollout step, response cap 4,000, prompt 2,000, block 4, global batch 8, bf16, distributed
optimizer on). Bad input raises ValueError with one line naming the input and the fix.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from megatron_opdlm.config import JobConfig, load_config
from megatron_opdlm.planning.gpus import GPUS, custom_gpu, gpu_by_name
from megatron_opdlm.planning.memory import ATTENTION, IMPLS, RECOMPUTE, PlanRequest

REQUIRED_HF = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "vocab_size")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("input (one of)")
    src.add_argument("--config", help="job YAML of the trainer (tools/train.py --config)")
    src.add_argument("--hf-config", help="HF config.json of the model (teacher = student arch)")
    src.add_argument("overrides", nargs="*", help="section.key=value overrides of the job YAML")
    hw = parser.add_argument_group("cluster")
    hw.add_argument("--gpu", default=None,
                    help=f"named GPU: {', '.join(GPUS)} (default h100-80g)")  # fmt: skip
    hw.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=None,
        help="GPU memory in GB (10^9 B) instead of a named GPU's (rates of --gpu)",
    )
    hw.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    hw.add_argument(
        "--nodes",
        type=int,
        default=None,
        help="nodes; world = nodes x gpus-per-node (default: TP x PP x DP)",
    )
    lay = parser.add_argument_group("layout")
    lay.add_argument(
        "--search",
        action="store_true",
        help="enumerate every valid TP/PP/VPP for the world size and rank them",
    )
    lay.add_argument("--tp", type=int, default=None, help="tensor-parallel size")
    lay.add_argument("--pp", type=int, default=None, help="pipeline-parallel size")
    lay.add_argument("--vpp", type=int, default=None, help="virtual stages per rank (0 = off)")
    lay.add_argument(
        "--dp",
        type=int,
        default=None,
        help="data-parallel size (must equal world / (TP x PP) when --nodes is given)",
    )
    lay.add_argument(
        "--distributed-optimizer",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="shard optimizer state over DP (HF default: on)",
    )
    lay.add_argument(
        "--sequence-parallel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sequence parallelism in TP regions",
    )
    num = parser.add_argument_group("numerics")
    num.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        default=None,
        help="parameter/activation dtype (HF default bf16)",
    )
    num.add_argument(
        "--fp8",
        choices=("none", "e4m3", "hybrid"),
        default=None,
        help="FP8 GEMMs (Transformer Engine): FP8 weight copies, FP8 peak FLOPs",
    )
    num.add_argument(
        "--recompute",
        choices=RECOMPUTE,
        default=None,
        help="activation recompute: none, selective (core attention), full (layers)",
    )
    num.add_argument("--attention", choices=ATTENTION, default="dense",
                     help="dense: unfused, materialises [b, a/tp, S, S] (TE with an arbitrary "
                          "mask, today's code); flex: FlexAttention block masks")  # fmt: skip
    num.add_argument(
        "--impl",
        choices=IMPLS,
        default="transformer_engine",
        help="layer implementation the activation model follows (GPU: TE)",
    )
    work = parser.add_argument_group("workload")
    work.add_argument(
        "--prompts-per-rollout",
        type=int,
        default=None,
        help="prompts per rollout step over all DP ranks (paper 128)",
    )
    work.add_argument(
        "--response-length", type=int, default=None, help="response length cap R (paper 4000)"
    )
    work.add_argument(
        "--prompt-length", type=int, default=None, help="longest prompt P (paper 2000)"
    )
    work.add_argument("--block-size", type=int, default=None, help="diffusion block size (4)")
    work.add_argument(
        "--steps-per-block", type=int, default=None, help="denoising rounds per block (4)"
    )
    work.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="teacher targets: top-K tokens held (0 = full vocabulary)",
    )
    work.add_argument("--micro-batch-size", type=int, default=None, help="rows per micro-batch")
    work.add_argument(
        "--global-batch-size",
        type=int,
        default=None,
        help="rows per optimizer step over all DP ranks (paper 8)",
    )


def _set(obj, name: str, value) -> None:
    if value is not None:
        setattr(obj, name, value)


def _load_hf(path: str) -> dict:
    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
    if not file.is_file():
        raise ValueError(f"--hf-config {path}: no such file; give an HF config.json")
    try:
        hf = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"--hf-config {path}: not valid JSON ({exc.msg}, line {exc.lineno})"
        ) from None
    missing = [k for k in REQUIRED_HF if k not in hf]
    if missing:
        raise ValueError(f"--hf-config {path}: missing field(s) {', '.join(missing)}; add them")
    return hf


def hf_model_factory(hf: dict):
    """ModelConfig for a TP size (the converter pads the vocabulary to lcm(128, TP))."""
    from megatron_opdlm.conversion.hf_config import model_config_from_hf

    def make(tp: int):
        return model_config_from_hf(hf, tp=tp)

    return make


def build_request(args: argparse.Namespace):
    """(PlanRequest, model_for_tp or None, search?) from parsed arguments."""
    if bool(args.config) == bool(args.hf_config):
        raise ValueError("give exactly one of --config JOB.yaml or --hf-config config.json")
    if args.gpu_memory_gb is not None:
        gpu = custom_gpu(args.gpu_memory_gb, args.gpu or "h100-80g")
    else:
        gpu = gpu_by_name(args.gpu or "h100-80g")
    for name in ("gpus_per_node", "nodes", "tp", "pp", "dp", "prompts_per_rollout",
                 "response_length", "prompt_length", "block_size", "micro_batch_size",
                 "global_batch_size", "steps_per_block"):  # fmt: skip
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}={value} must be >= 1")
    model_for_tp = None
    if args.hf_config:
        if args.overrides:
            raise ValueError(f"overrides {args.overrides} apply to --config only; use the flags")
        hf = _load_hf(args.hf_config)
        model_for_tp = hf_model_factory(hf)
        job = JobConfig()
        try:
            job.model = model_for_tp(args.tp or 1)
        except KeyError as exc:
            raise ValueError(f"--hf-config {args.hf_config}: missing field {exc}; add it") from None
        job.precision.dtype, job.parallel.use_distributed_optimizer = "bf16", True
        job.train.prompts_per_rollout, job.train.global_batch_size = 128, 8
        job.curriculum.schedule, job.curriculum.length_max = "linear", 4000
        job.data.max_prompt_length = 2000
        job.rollout.max_new_tokens = 4000
    else:
        job = load_config(args.config, list(args.overrides))
        adopt_teacher_architecture(job)
    par, train = job.parallel, job.train
    _set(par, "tp", args.tp)
    _set(par, "pp", args.pp)
    if args.vpp is not None:
        par.vpp = args.vpp or None
    _set(par, "use_distributed_optimizer", args.distributed_optimizer)
    _set(par, "sequence_parallel", args.sequence_parallel)
    _set(job.precision, "dtype", args.dtype)
    _set(job.precision, "fp8", args.fp8)
    _set(train, "prompts_per_rollout", args.prompts_per_rollout)
    _set(train, "micro_batch_size", args.micro_batch_size)
    _set(train, "global_batch_size", args.global_batch_size)
    _set(job.diffusion, "block_size", args.block_size)
    _set(job.rollout, "steps_per_block", args.steps_per_block)
    _set(job.data, "max_prompt_length", args.prompt_length)
    if args.response_length is not None:
        job.rollout.max_new_tokens = args.response_length
        job.curriculum.length_max = args.response_length
        job.curriculum.length_min = min(job.curriculum.length_min, args.response_length)
    world = None
    if args.nodes is not None:
        world = args.nodes * args.gpus_per_node
    elif "WORLD_SIZE" in os.environ and args.config and args.dp is None:
        world = int(os.environ["WORLD_SIZE"])
    model_parallel = par.tp * par.pp
    if world is None:
        dp = args.dp or 1
        world = dp * model_parallel
    else:
        if world % model_parallel and not args.search:
            raise ValueError(
                f"world size {world} (--nodes x --gpus-per-node, or WORLD_SIZE) is not divisible "
                f"by TP {par.tp} x PP {par.pp}; pick sizes that divide it or use --search"
            )
        dp = world // model_parallel if world % model_parallel == 0 else 1
        if args.dp is not None and args.dp != dp:
            raise ValueError(
                f"--dp={args.dp} but world {world} / (TP {par.tp} x PP {par.pp}) = {dp}; "
                "drop --dp or make it match"
            )
    if args.search and world % model_parallel:
        par.tp = par.pp = 1
        par.vpp = None
        dp = world
    job.validate(world if not args.search else None)
    req = request_from_job(job, dp * par.tp * par.pp, gpu, args.gpus_per_node,
                           recompute=args.recompute, attention=args.attention, impl=args.impl,
                           top_k=args.top_k)  # fmt: skip
    return req, model_for_tp, args.search


def adopt_teacher_architecture(job: JobConfig) -> None:
    """The trainer takes the model section from checkpoint.teacher: so does the planner."""
    if job.checkpoint.teacher is None:
        return
    from megatron_opdlm.training.setup import adopt_teacher_model_config

    try:
        adopt_teacher_model_config(job)
    except (OSError, ValueError) as exc:
        raise ValueError(f"checkpoint.teacher={job.checkpoint.teacher}: {exc}") from None


def request_from_job(
    job: JobConfig,
    world: int,
    gpu,
    gpus_per_node: int,
    recompute: str | None = None,
    attention: str = "dense",
    impl: str | None = None,
    top_k: int | None = None,
) -> PlanRequest:
    """The PlanRequest of a trainer job at `world` GPUs (knobs left None follow the job)."""
    from megatron_opdlm.training.setup import ROLLOUT_MODES, TEACHER_MODES

    if top_k is None:
        top_k = job.distill.top_k if job.distill.divergence == "topk_forward_kl" else 0
    if impl is None:
        impl = "local" if job.precision.transformer_impl == "local" else "transformer_engine"
    cap = job.curriculum.length_max if job.curriculum.schedule != "none" else None
    return PlanRequest(
        job=job, dp=world // (job.parallel.tp * job.parallel.pp),
        prompt_length=job.data.max_prompt_length,
        response_length=cap or job.rollout.max_new_tokens,
        gpu=gpu, gpus_per_node=gpus_per_node, recompute=recompute or job.precision.recompute,
        attention=attention, impl=impl, top_k=top_k or None,
        with_teacher=job.distill.mode in TEACHER_MODES or job.data.eval_prompts is not None,
        with_rollout=job.distill.mode in ROLLOUT_MODES,
    )  # fmt: skip
