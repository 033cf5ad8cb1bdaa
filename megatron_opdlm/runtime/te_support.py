"""What the installed Transformer Engine (TE) and GPU allow: FP8 recipes, cached rollouts.

Pure checks over a version and a compute capability, so the rules are tested without a GPU;
`installed_te_version` / `gpu_capability` read the real ones (never importing TE on a CPU).

- FP8 recipes (`precision.fp8_recipe`, the names of megatron-core's `Fp8Recipe`): `delayed`
  (delayed scaling with an amax history), `tensorwise` (current scaling), `blockwise`
  (1x128 / 128x128 block scales) and `mxfp8` (32-element micro-blocks). The minimum TE versions
  are the ones megatron-core 0.19's `fp8_utils.get_fp8_recipe` tests for; FP8 GEMMs need compute
  capability 8.9 (Ada) or newer, blockwise 9.0 (Hopper), MXFP8 10.0 (Blackwell).
- FP8 GEMMs need their row count (tokens) aligned; the rows are padded to `FP8_ROW_MULTIPLE`
  (16 for per-tensor scales as TE asserts, 32 for MXFP8's blocks, 128 for blockwise's).
- Cached rollouts rely on megatron-core honouring an explicit mask when the KV-cache offset is
  > 0, which it only does on TE >= 2.2 (megatron/core/transformer/attention.py forces
  `no_mask` otherwise; see `diffusion.kv_cache.ExplicitMasks`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import torch
from packaging.version import Version

FP8_RECIPE_MIN_TE = {
    "delayed": "1.0.0",
    "tensorwise": "2.2.0.dev0",
    "blockwise": "2.3.0.dev0",
    "mxfp8": "2.1.0",
}
FP8_RECIPE_MIN_CAPABILITY = {
    "delayed": (8, 9),
    "tensorwise": (8, 9),
    "blockwise": (9, 0),
    "mxfp8": (10, 0),
}
FP8_ROW_MULTIPLE = {"delayed": 16, "tensorwise": 16, "blockwise": 128, "mxfp8": 32}
CACHED_ROLLOUT_MIN_TE = "2.2.0.dev0"
_TE_DISTRIBUTIONS = ("transformer-engine", "transformer_engine", "transformer-engine-torch")


def installed_te_version() -> Version | None:
    """The installed Transformer Engine's version, None without one (TE is not imported)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return None
    for name in _TE_DISTRIBUTIONS:
        try:
            return Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            continue
    import transformer_engine  # a source build without distribution metadata

    return Version(str(transformer_engine.__version__))


def gpu_capability() -> tuple[int, int] | None:
    """The current CUDA device's compute capability, None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())


def check_fp8(recipe: str, te_version: Version | None, capability: tuple[int, int] | None) -> None:
    """ValueError naming the problem and the fix when `recipe` cannot run here."""
    if recipe not in FP8_RECIPE_MIN_TE:
        raise ValueError(
            f"precision.fp8_recipe={recipe!r} is not one of {sorted(FP8_RECIPE_MIN_TE)}"
        )
    if te_version is None:
        raise ValueError(
            "precision.fp8 needs Transformer Engine, which is not installed; use an NGC PyTorch "
            "image (or pip install transformer-engine[pytorch]) or set precision.fp8=none"
        )
    needed = Version(FP8_RECIPE_MIN_TE[recipe])
    if te_version < needed:
        raise ValueError(
            f"precision.fp8_recipe={recipe} needs Transformer Engine >= {needed.base_version}, "
            f"this one is {te_version}; upgrade TE or use precision.fp8_recipe=delayed"
        )
    if capability is None:
        raise ValueError("precision.fp8 needs a CUDA GPU; set precision.fp8=none on this machine")
    if capability < FP8_RECIPE_MIN_CAPABILITY[recipe]:
        major, minor = FP8_RECIPE_MIN_CAPABILITY[recipe]
        raise ValueError(
            f"precision.fp8_recipe={recipe} needs a GPU of compute capability >= {major}.{minor}, "
            f"this one is {capability[0]}.{capability[1]}; "
            + (
                "use precision.fp8_recipe=delayed or tensorwise"
                if capability >= (8, 9)
                else "this GPU has no FP8: set precision.fp8=none (bf16)"
            )
        )


def check_cached_rollout(te_version: Version | None) -> None:
    """ValueError when Transformer Engine is too old for the KV-cached rollout's explicit masks."""
    if te_version is not None and te_version < Version(CACHED_ROLLOUT_MIN_TE):
        raise ValueError(
            f"Transformer Engine {te_version} is older than 2.2: megatron-core then ignores the "
            "explicit attention mask of cached rollout rounds (they would attend to the left "
            "padding and across blocks). Upgrade to transformer-engine >= 2.2, or set "
            "rollout.use_kv_cache=false, or precision.transformer_impl=local"
        )


def fp8_row_multiple(recipe: str) -> int:
    """The multiple an FP8 GEMM's row count (tokens per micro-batch and rank) is padded to."""
    return FP8_ROW_MULTIPLE[recipe]
