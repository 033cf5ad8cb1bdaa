"""One forward of the sampler through this rank's model chunks, under TP and PP (and VPP).

Every rank of a model-parallel group calls `forward` with the same tokens and mask. The first
stage embeds the tokens; hidden states [s, b, h] (whole, see `sequence_parallel_off`) go stage
to stage with megatron's P2PCommunicator (virtual stages in the interleaved order: chunk v of
pipeline rank r is global stage v * pp + r); the last stage projects only the query rows the
sampler asked for and gathers them over tensor-parallel ranks, so it returns full-vocabulary
logits [b, n, V] and every other rank returns None. Decisions made from those logits are sent
back with `broadcast_from_last_stage`, so all ranks of the pipeline keep the same tokens.

`wait_seconds` adds up the time this rank spent in pipeline communication (receiving, sending,
the broadcast): a stage's own cost of a forward is its wall time minus that (the rollout engine's
pipelined rounds measure t(b) and t(b/M) this way, `diffusion.engine_pipeline`). CUDA kernels
run asynchronously, so while `sync_timing` is set each communication is bracketed by device
synchronisations: compute before it counts as the stage's, the transfer as waiting.
"""

from __future__ import annotations

import contextlib
import time

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.utils import get_attr_wrapped_model

from megatron_opdlm.models.projection import project_rows_gathered
from megatron_opdlm.runtime import collectives, cpu_compat


class ModelRunner:
    """Runs this rank's chunks as one pipeline forward (no gradients)."""

    def __init__(self, model_chunks: list[torch.nn.Module]):
        if not model_chunks:
            raise ValueError("model_chunks is empty: pass this rank's list of model chunks")
        self.chunks = model_chunks
        self.config = get_attr_wrapped_model(model_chunks[0], "config")
        self.pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.hidden_size = self.config.hidden_size
        self.pre_process = [get_attr_wrapped_model(c, "pre_process") for c in model_chunks]
        self.post_process = [get_attr_wrapped_model(c, "post_process") for c in model_chunks]
        self.is_last_stage = self.post_process[-1]
        self.communicator = None
        self.wait_seconds = 0.0  # time in pipeline communication (see the module docstring)
        self.sync_timing = False  # CUDA: synchronise around communication (measurements)
        if self.pp_size > 1:
            self.pp_group = parallel_state.get_pipeline_model_parallel_group()
            self.communicator = P2PCommunicator(self.pp_group, self.config)
            self.last_stage_rank = parallel_state.get_pipeline_model_parallel_last_rank()

    @torch.no_grad()
    def forward(
        self,
        tokens: torch.Tensor,  # [b, s] long
        positions: torch.Tensor,  # [b, s] long
        attention_mask: torch.Tensor,  # [b, 1, s, k] bool, True = masked out
        logit_rows: torch.Tensor,  # [n] long, query rows (0..s-1) to project
        inference_context=None,
        output_processor=project_rows_gathered,
    ) -> torch.Tensor | None:
        """Full-vocabulary logits [b, n, V] float32 on the last stage, None elsewhere.

        `output_processor` reads `logit_rows` as its context (the engine passes a per-row one)."""
        b, s = tokens.shape
        output = None
        for chunk, first, last in zip(self.chunks, self.pre_process, self.post_process):
            if not first:
                start = self.communication_start()
                hidden = self.communicator.recv_forward(
                    [s, b, self.hidden_size], is_first_stage=False
                )
                self.communication_end(start)
                get_attr_wrapped_model(chunk, "set_input_tensor")(hidden)
            output = chunk(
                tokens,
                positions,
                attention_mask,
                inference_context=inference_context,
                runtime_gather_output=True,
                output_processor=output_processor,
                output_processor_context=logit_rows,
            )
            if not last:
                start = self.communication_start()
                self.communicator.send_forward(output, is_last_stage=False)
                self.communication_end(start)
        return output.float() if self.is_last_stage else None

    def broadcast_from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        """The last pipeline stage's `tensor` on every stage (same shape and dtype everywhere)."""
        if self.pp_size > 1:
            start = self.communication_start()
            collectives.broadcast_tensor_(tensor, src=self.last_stage_rank, group=self.pp_group)
            self.communication_end(start)
        return tensor

    def communication_start(self) -> float:
        if self.sync_timing:
            torch.cuda.synchronize()
        return time.perf_counter()

    def communication_end(self, start: float) -> None:
        """Count the seconds since `start` (communication_start) as waiting."""
        if self.sync_timing:
            torch.cuda.synchronize()
        self.wait_seconds += time.perf_counter() - start


@contextlib.contextmanager
def sequence_parallel_off(model_chunks: list[torch.nn.Module]):
    """Run a sequence-parallel model without sequence parallelism for the rollout.

    A block of B tokens (or a prompt) need not divide by the TP size, and the sampler reads
    single query rows, so rollout activations stay whole on every TP rank: the configs and every
    module's `sequence_parallel` / `reduce_scatter_embeddings` flag (the linear layers switch
    from all-gather / reduce-scatter to copy / all-reduce, the same math) are turned off for the
    call and restored after. The weights are the same; only the communication pattern changes.
    """
    saved = []
    for chunk in model_chunks:
        for module in chunk.modules():
            for name in ("sequence_parallel", "reduce_scatter_embeddings"):
                if isinstance(getattr(module, name, None), bool) and getattr(module, name):
                    saved.append((module, name))
            config = getattr(module, "config", None)
            if getattr(config, "sequence_parallel", False):
                saved.append((config, "sequence_parallel"))
    for owner, name in saved:
        setattr(owner, name, False)
    try:
        yield
    finally:
        for owner, name in saved:
            setattr(owner, name, True)


@contextlib.contextmanager
def fp8_off(model_chunks: list[torch.nn.Module]):
    """Run an FP8-trained model in its parameter dtype for the call (rollout, evaluation).

    FP8 is for the student's training GEMMs: rollout GEMMs have b x B or b x P rows (not TE's FP8
    row multiples), and DP ranks run data-dependent numbers of rollout forwards, so a delayed-
    scaling amax reduction over DP would wait for ranks that never join. megatron-core enters
    FP8 only when `config.fp8` is set: it is cleared on every config for the call, restored
    after.
    """
    configs = {
        id(config): config
        for chunk in model_chunks
        for module in chunk.modules()
        if getattr(config := getattr(module, "config", None), "fp8", None)
    }
    saved = [(config, config.fp8) for config in configs.values()]
    for config, _ in saved:
        config.fp8 = None
    try:
        yield
    finally:
        for config, value in saved:
            config.fp8 = value


@contextlib.contextmanager
def eval_mode(model_chunks: list[torch.nn.Module]):
    """Eval mode (no dropout) for the rollout; each module's training flag restored after."""
    modes = [(m, m.training) for chunk in model_chunks for m in chunk.modules()]
    for chunk in model_chunks:
        chunk.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def decoding_mode(model_chunks: list[torch.nn.Module]):
    """What both decoders (sampler.generate, engine.generate_rollout) run the model under: eval
    mode, sequence parallelism and FP8 off, and the CPU small-row linears; all restored after."""
    with (
        eval_mode(model_chunks),
        sequence_parallel_off(model_chunks),
        fp8_off(model_chunks),
        cpu_compat.small_row_linears(model_chunks),
    ):
        yield
