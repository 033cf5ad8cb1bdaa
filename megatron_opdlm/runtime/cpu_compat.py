"""The one place that lets megatron-core 0.19.x run without CUDA (CPU torch or a CUDA build on a
machine with no GPU), with gloo.

Nothing else in the project knows these patches exist: `apply()` is called by
`runtime.distributed.initialize()` before any model is built, and does nothing when CUDA is
available. Each patch is listed with the failure it fixes (`tests/unit/test_cpu_compat.py`
turns each one off and checks that the failure comes back).

Patches (names usable in `apply(skip=...)` / env OPDLM_CPU_COMPAT_SKIP="current_device,rng"):
  triton_stub     `import megatron.core` imports triton (MoE paged stash) -> ModuleNotFoundError on
                  a CPU torch wheel without triton. Registers a stub for that one module.
  current_device  buffers allocated on `torch.cuda.current_device()` (GlobalMemoryBuffer, RoPE,
                  KV cache, DDP buffers) -> "Torch not compiled with CUDA enabled".
  cuda_literals   literal device="cuda" / `.cuda()` (default causal mask, schedules' token counts,
                  embedding sync with PP>1). A TorchFunctionMode is not enough: it is disabled
                  inside Tensor.backward, where activation recompute re-runs the forward.
  rng             CudaRNGStatesTracker and recompute save/restore the CUDA RNG state; on CPU the
                  dropout draws from the CPU generator, so track that one.
  streams         DDP grad sync uses torch.cuda streams and events; CPU ops are synchronous, so
                  no-op streams are exact.
  type_names      optimizers and grad clipping compare `param.type()` to 'torch.cuda.FloatTensor';
                  report CUDA names for CPU tensors inside those functions only.

Config values (not patches; `transformer_config_overrides()`, used by models.builder):
  batch_p2p_comm=False  batched isend/irecv on gloo hands later micro-batches of the interleaved
                  (virtual pipeline) schedule the wrong activations (logits off by ~0.2 from the
                  third micro-batch on; tests/distributed/test_model_parallel.py); unbatched p2p
                  is exact.

Speed (not a fix; a context manager the sampler enters, a no-op with CUDA):
  small_row_linears  the sampler's forwards carry a block of a few tokens; on CPU megatron's
                  x @ W^T costs up to 2.4x a one-token forward there, W @ x^T about 1x up to 4
                  rows, oneDNN's linear about 1x up to 8 (16) rows.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import types

ALL_PATCHES = ("triton_stub", "current_device", "cuda_literals", "rng", "streams", "type_names")
_applied: set[str] = set()

_TENSOR_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "as_tensor", "arange", "rand", "randn", "randint",
    "randperm", "empty_strided", "zeros_like", "ones_like", "empty_like", "full_like", "eye",
    "linspace",
)  # fmt: skip


def needed() -> bool:
    """True when megatron-core must be patched: no usable CUDA device."""
    import torch

    return not torch.cuda.is_available()


def transformer_config_overrides() -> dict:
    """TransformerConfig values that megatron-core needs on gloo (see the module docstring)."""
    return {"batch_p2p_comm": False} if needed() else {}


def applied() -> frozenset[str]:
    return frozenset(_applied)


def _install_triton_stub() -> None:
    try:
        import triton  # noqa: F401  (a real triton: nothing to do)

        return
    except ImportError:
        pass
    name = "megatron.core.transformer.moe.ops.paged_stash"
    stub = types.ModuleType(name)
    stub.GLOBAL_BLOCK_SIZE = 1024

    def _unavailable(*args, **kwargs):
        raise RuntimeError("MoE paged-stash kernels need triton, which is not installed")

    class _Kernel:
        def __getitem__(self, grid):
            return _unavailable

    stub.paged_stash_copy_kernel = _Kernel()
    stub.paged_stash_pop_kernel = _Kernel()
    sys.modules[name] = stub


def _is_cuda_device(device) -> bool:
    import torch

    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _patch_current_device() -> None:
    import torch

    torch.cuda.current_device = lambda: torch.device("cpu")


def _patch_cuda_literals() -> None:
    import torch

    def to_cpu(factory):
        @functools.wraps(factory)
        def wrapper(*args, **kwargs):
            if _is_cuda_device(kwargs.get("device")):
                kwargs["device"] = "cpu"
            return factory(*args, **kwargs)

        return wrapper

    # `with torch.device("meta")` (transformers' model init) recognises factories through a
    # cached set of torch functions: fill that cache with the originals before wrapping them,
    # or factories stop honouring the device context (HF RoPE buffers came out uninitialised).
    from torch.utils._device import _device_constructors

    _device_constructors()
    for name in _TENSOR_FACTORIES:
        setattr(torch, name, to_cpu(getattr(torch, name)))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    torch.cuda.synchronize = lambda *args, **kwargs: None


class _NoOpEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _NoOpStream(_NoOpEvent):
    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _NoOpEvent()

    @staticmethod
    def priority_range():
        return (0, 0)


def _patch_streams() -> None:
    import torch

    stream = _NoOpStream()
    torch.cuda.Stream = _NoOpStream
    torch.cuda.Event = _NoOpEvent
    torch.cuda.current_stream = lambda *args, **kwargs: stream
    torch.cuda.default_stream = lambda *args, **kwargs: stream
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()


def _patch_rng() -> None:
    import torch
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Same contract as the CUDA tracker, on the CPU default generator."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            outer = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    def initialize_rng_tracker(*args, force_reset=False, **kwargs):
        if force_reset or not mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED:
            mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
            mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    original_seed = mrandom.model_parallel_cuda_manual_seed

    def model_parallel_cuda_manual_seed(seed, *args, **kwargs):
        torch.manual_seed(seed)
        return original_seed(seed, *args, **kwargs)

    mrandom.CpuRNGStatesTracker = CpuRNGStatesTracker
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)
    mrandom.initialize_rng_tracker = initialize_rng_tracker
    mrandom.model_parallel_cuda_manual_seed = model_parallel_cuda_manual_seed
    tensor_parallel.model_parallel_cuda_manual_seed = model_parallel_cuda_manual_seed


@contextlib.contextmanager
def _cuda_type_names():
    import torch

    original = torch.Tensor.type

    def cuda_named_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = cuda_named_type
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(owner, name: str) -> None:
    function = getattr(owner, name)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return function(*args, **kwargs)

    setattr(owner, name, wrapper)


def _patch_type_names() -> None:
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    _with_cuda_type_names(distrib_optimizer.DistributedOptimizer, "__init__")
    _with_cuda_type_names(optimizer.Float16OptimizerWithFloat16Params, "__init__")
    _with_cuda_type_names(clip_grads, "clip_grad_by_total_norm_fp32")
    for module in (optimizer, distrib_optimizer):
        if hasattr(module, "clip_grad_by_total_norm_fp32"):
            module.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32


_PATCHES = {
    "current_device": _patch_current_device,
    "cuda_literals": _patch_cuda_literals,
    "rng": _patch_rng,
    "streams": _patch_streams,
    "type_names": _patch_type_names,
}


def apply(skip: tuple[str, ...] | None = None) -> frozenset[str]:
    """Apply every patch not in `skip` (idempotent). Returns the set applied so far."""
    if skip is None:
        skip = tuple(p for p in os.environ.get("OPDLM_CPU_COMPAT_SKIP", "").split(",") if p)
    unknown = set(skip) - set(ALL_PATCHES)
    if unknown:
        raise ValueError(f"unknown CPU patch names {sorted(unknown)}; known: {ALL_PATCHES}")
    if "triton_stub" not in skip and "triton_stub" not in _applied:
        _install_triton_stub()
        _applied.add("triton_stub")
    if not needed():
        return applied()
    for name, patch in _PATCHES.items():
        if name not in skip and name not in _applied:
            patch()
            _applied.add(name)
    return applied()


# Rows at or below which `small_row_linears` replaces megatron's x @ W^T. MKL's sgemm packs the
# weight for x @ W^T; with a handful of rows that packing dominates. tools/bench/
# bench_small_row_linear.py (all 121 projections of one SmolLM2-135M forward, 1 thread, 2-core dev
# machine, quiet): x @ W^T vs W @ x^T = 3 rows 95.6 vs 45.7 ms, 4 rows 62.0 vs 45.4 (1 row: 44 ms),
# 5 rows 72.1 vs 58.1, 6-8 rows even (0.94-0.99x), 9 rows 82.8 vs 104.6. Past 4 rows oneDNN's
# linear takes over (below): under load, best of 8-20 alternating runs, x @ W^T vs oneDNN = 16
# rows 189 vs 108 ms, 32 rows 421 vs 213, 67 rows 738 vs 373; 64 keeps the engine's rounds of up
# to 16 slots (4 queries each) on the fast path. Prefills of longer prompts keep megatron's.
SMALL_ROWS = 64
# Rows at or below which W @ x^T is used; above (up to SMALL_ROWS) oneDNN's linear, whose cost
# stays flat with the row count where MKL's grows (same 121 projections, 1 thread, AMD EPYC,
# under load, best of 8-20 alternating runs): 5 rows W @ x^T 151 ms vs oneDNN 119, 6 rows 190
# vs 106, 8 rows 161 vs 105, 16 rows 208 vs 108; at 1-4 rows the two are within noise. The
# engine's fused-commit round (8 rows) cost 1.8x a 4-row round with W @ x^T (profile in
# docs/bench_rollout/README.md). Without oneDNN: W @ x^T up to 8 rows, megatron's x @ W^T above.
WEIGHT_FIRST_ROWS = 4
NO_ONEDNN_ROWS = 8


@functools.cache
def onednn_linear_available() -> bool:
    """True when torch's oneDNN fp32 linear runs here and is IEEE fp32 (no implicit bf16/tf32)."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if getattr(matmul, "fp32_precision", "none") not in ("none", "ieee"):
        return False
    try:
        weight, x = torch.ones(3, 2), torch.ones(5, 2)
        out = torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return out.shape == (5, 3) and bool((out == 2).all())


def _onednn_linear(flat, weight):
    import torch

    return torch.ops.mkldnn._linear_pointwise(flat, weight, None, "none", [], "")


def _few_row_linear(flat, weight):
    """flat [m, in] @ weight [out, in]^T -> [m, out] for m <= SMALL_ROWS (see the constants)."""
    import torch

    rows = flat.shape[0]
    if rows > WEIGHT_FIRST_ROWS and onednn_linear_available():
        return _onednn_linear(flat, weight)
    if rows > NO_ONEDNN_ROWS:  # megatron's own product (x @ W^T), as if not replaced
        return torch.matmul(flat, weight.t())
    return torch.mm(weight, flat.t()).t().contiguous()  # [out, m] -> [m, out]


def few_row_linear_applies(input, sequence_parallel=False, gtp_remat_size=1) -> bool:
    """True when `small_row_linears` computes this product itself: CPU, fp32, no autograd, at
    most SMALL_ROWS rows, no sequence parallelism or remat."""
    import torch

    return not (
        torch.is_grad_enabled()
        or sequence_parallel
        or gtp_remat_size > 1
        or input.device.type != "cpu"
        or input.dtype != torch.float32
        or input.numel() // input.shape[-1] > SMALL_ROWS
    )


def few_row_linear(input, weight):
    """input [..., in] @ weight [out, in]^T -> [..., out] (where `few_row_linear_applies`)."""
    rows = input.numel() // input.shape[-1]
    output = _few_row_linear(input.reshape(rows, input.shape[-1]), weight)  # [m, out]
    return output.view(*input.shape[:-1], weight.shape[0])


def _small_row_forward_impl(module):
    """`_forward_impl` for one megatron linear: few rows without autograd on CPU."""
    fallback = type(module)._forward_impl.__get__(module)

    def forward_impl(input, weight, bias=None, sequence_parallel=False, **kwargs):
        if not few_row_linear_applies(input, sequence_parallel, kwargs.get("gtp_remat_size", 1)):
            return fallback(
                input=input, weight=weight, bias=bias, sequence_parallel=sequence_parallel,
                **kwargs,
            )  # fmt: skip
        output = few_row_linear(input, weight)
        return output if bias is None else output + bias

    return forward_impl


@contextlib.contextmanager
def small_row_linears(model_chunks):
    """CPU speed-up for the sampler's few-token forwards (a block of B tokens, a few projected
    rows): megatron's Column/RowParallelLinear compute x @ W^T, which on CPU costs 1.5-2.4x a
    one-row forward at 3-8 rows (see SMALL_ROWS); W @ x^T costs about the same as one row up to
    4 rows, oneDNN's linear (when torch has it, IEEE fp32) up to 8.
    Same math, summed in another order (fp32 results differ in the last bits). Does nothing when
    CUDA is in use or under autograd; the previous `_forward_impl` is restored on exit."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    linears = []
    if needed():
        linears = [
            m
            for chunk in model_chunks
            for m in chunk.modules()
            if isinstance(m, ColumnParallelLinear | RowParallelLinear)
            and "_forward_impl" not in vars(m)
        ]
    for module in linears:
        module._forward_impl = _small_row_forward_impl(module)
    try:
        yield
    finally:
        for module in linears:
            del module._forward_impl
