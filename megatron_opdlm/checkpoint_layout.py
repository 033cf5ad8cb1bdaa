"""How a megatron-opdlm checkpoint is stored: what the converter and the trainer write, and what
training, evaluation, generation and export load.

    <ckpt>/opdlm_model.yaml   {format_version: 1, model: ModelConfig,
                               diffusion: DiffusionConfig | null}
    <ckpt>/model/             megatron.core.dist_checkpointing (torch_dist) of the model's
                              sharded_state_dict: layout-free, loadable at any TP/PP/VPP
    <ckpt>/tokenizer/         the HF tokenizer files of the source model

A trainer save directory holds `latest` (the name of its newest complete iteration directory)
and iteration directories that have this layout plus the training state (training/checkpointing.py).

`diffusion: null` marks an AR model (a teacher); a trained student records its DiffusionConfig.
Virtual-pipeline chunks are nested under `chunk<i>` in the state dict passed to dist_checkpointing;
the nesting only names the local dict, the stored (global) keys are those of a single-chunk model.
Saves are written to a hidden sibling directory and renamed when complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml

from megatron_opdlm import config_base
from megatron_opdlm.config import DiffusionConfig, ModelConfig
from megatron_opdlm.runtime import collectives
from megatron_opdlm.runtime.logging import get_logger

FORMAT_VERSION = 1
META_FILE = "opdlm_model.yaml"
MODEL_DIR = "model"
TOKENIZER_DIR = "tokenizer"
LATEST = "latest"  # in a trainer save directory: the name of the newest complete iteration
# Files an HF tokenizer may consist of (copied when present).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)  # fmt: skip

log = get_logger(__name__)


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """`path`, or `path/<name in path/latest>` for a trainer save directory."""
    path = Path(path)
    latest = path / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        target = path / name
        previous = path / f".{name}.old"
        if name and not target.is_dir() and previous.is_dir():
            # A crash while a step was saved again, between moving the old copy aside and
            # renaming the new one in: the old copy is complete.
            log.warning("%s is missing; using its previous copy %s", target, previous)
            return previous
        if not name or not target.is_dir():
            raise ValueError(
                f"{latest} names {name!r}, which is not a directory in {path}; "
                "the save directory is incomplete (pass the iteration directory itself)"
            )
        return target
    return path


def write_model_meta(
    ckpt_dir: str | Path, model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig | None
) -> None:
    """Write opdlm_model.yaml (temp name + rename)."""
    meta = {
        "format_version": FORMAT_VERSION,
        "model": config_base.to_dict(model_cfg),
        "diffusion": None if diffusion_cfg is None else config_base.to_dict(diffusion_cfg),
    }
    path = Path(ckpt_dir) / META_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(meta, sort_keys=False))
    tmp.replace(path)


def read_model_meta(ckpt_dir: str | Path) -> tuple[ModelConfig, DiffusionConfig | None]:
    """(ModelConfig, DiffusionConfig or None for an AR model) of a checkpoint directory."""
    ckpt_dir = resolve_checkpoint_dir(ckpt_dir)
    path = ckpt_dir / META_FILE
    if not path.is_file():
        raise ValueError(
            f"{ckpt_dir} is not a megatron-opdlm checkpoint (no {META_FILE}); convert a Hugging "
            "Face model with tools/convert_hf_to_megatron.py, or pass a trainer save directory"
        )
    meta = yaml.safe_load(path.read_text()) or {}
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version={version!r}, this code reads version {FORMAT_VERSION}"
        )
    model_cfg = config_base.from_dict(ModelConfig, meta.get("model") or {}, "model.")
    model_cfg.validate()
    diffusion = meta.get("diffusion")
    diffusion_cfg = None
    if diffusion is not None:
        diffusion_cfg = config_base.from_dict(DiffusionConfig, diffusion, "diffusion.")
        diffusion_cfg.validate()
    return model_cfg, diffusion_cfg


def copy_tokenizer(tokenizer_dir: str | Path, dest: str | Path) -> list[str]:
    """Copy the HF tokenizer files found in `tokenizer_dir` to `dest`; the names copied."""
    src = Path(tokenizer_dir)
    if (src / TOKENIZER_DIR).is_dir() and (src / META_FILE).is_file():
        src = src / TOKENIZER_DIR  # a checkpoint directory: take its tokenizer
    found = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not any(name in found for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ValueError(
            f"no tokenizer in {src} (looked for tokenizer.json, tokenizer.model, vocab.json)"
        )
    Path(dest).mkdir(parents=True, exist_ok=True)
    for name in found:
        shutil.copy2(src / name, Path(dest) / name)
    return found


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module"):  # Float16Module, DDP
        module = module.module
    return module


def _sharded_state_dict(chunks) -> dict:
    if len(chunks) == 1:
        return _unwrap(chunks[0]).sharded_state_dict()
    return {f"chunk{i}": _unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(chunks)}


def _is_rank0() -> bool:
    return collectives.group_rank() == 0


def _barrier() -> None:
    collectives.barrier()


def _raise_if_any(message: str | None) -> None:
    """Raise on every rank when any rank found a problem (no rank hangs)."""
    message = next((m for m in collectives.gather_strings(message) if m), None)
    if message:
        raise ValueError(message)


_broadcast_error = _raise_if_any  # rank 0's problem, seen by every rank


def save_model_checkpoint(
    chunks,
    ckpt_dir: str | Path,
    model_cfg: ModelConfig,
    diffusion_cfg: DiffusionConfig | None = None,
    tokenizer_dir: str | Path | None = None,
) -> None:
    """Save this rank's model chunks; collective over all ranks.

    Written to `.<name>.tmp` beside `ckpt_dir` and renamed when complete; an existing `ckpt_dir`
    is replaced only after the new one is complete.
    """
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir).absolute()
    tmp = ckpt_dir.with_name(f".{ckpt_dir.name}.tmp")
    error = None
    if _is_rank0():
        try:
            if tmp.exists():
                shutil.rmtree(tmp)  # left over from an interrupted save
            (tmp / MODEL_DIR).mkdir(parents=True)
            write_model_meta(tmp, model_cfg, diffusion_cfg)
            if tokenizer_dir is not None:
                copy_tokenizer(tokenizer_dir, tmp / TOKENIZER_DIR)
        except (OSError, ValueError) as exc:
            error = f"cannot prepare checkpoint directory {tmp}: {exc}"
    _broadcast_error(error)
    dist_checkpointing.save(_sharded_state_dict(chunks), str(tmp / MODEL_DIR))
    _barrier()
    if _is_rank0():
        old = ckpt_dir.with_name(f".{ckpt_dir.name}.old")
        if ckpt_dir.exists():
            if old.exists():
                shutil.rmtree(old)
            ckpt_dir.rename(old)
        tmp.rename(ckpt_dir)
        if old.exists():
            shutil.rmtree(old)
        log.info("saved model checkpoint %s", ckpt_dir)
    _barrier()


def _is_extra_state(key: str) -> bool:
    # `_extra_state` objects hold Transformer Engine FP8 metadata (None for the local spec):
    # a checkpoint written with one layer implementation must load into the other.
    return "._extra_state" in key


def _check_architecture(chunks, model_cfg: ModelConfig, ckpt_dir: Path) -> None:
    model = _unwrap(chunks[0])
    tcfg = model.config
    pairs = {
        "num_layers": (tcfg.num_layers, model_cfg.num_layers),
        "hidden_size": (tcfg.hidden_size, model_cfg.hidden_size),
        "ffn_hidden_size": (tcfg.ffn_hidden_size, model_cfg.ffn_hidden_size),
        "num_attention_heads": (tcfg.num_attention_heads, model_cfg.num_attention_heads),
        "num_query_groups": (tcfg.num_query_groups, model_cfg.num_query_groups),
        "kv_channels": (tcfg.kv_channels, model_cfg.kv_channels),
        "padded_vocab_size": (getattr(model, "vocab_size", None), model_cfg.padded_vocab_size),
        "qk_layernorm": (bool(tcfg.qk_layernorm), model_cfg.qk_layernorm),
        "qkv_bias": (bool(tcfg.add_qkv_bias), model_cfg.qkv_bias),
        "tie_word_embeddings": (
            bool(getattr(model, "share_embeddings_and_output_weights", False)),
            model_cfg.tie_word_embeddings,
        ),
    }
    diffs = [f"{k}: model {a} vs checkpoint {b}" for k, (a, b) in pairs.items() if a != b]
    if diffs:
        raise ValueError(
            f"checkpoint {ckpt_dir} does not fit the model built here ({'; '.join(diffs)}); "
            f"build the model from the checkpoint's own config (read_model_meta)"
        )


def load_model_checkpoint(chunks, ckpt_dir: str | Path) -> None:
    """Load a checkpoint into this rank's model chunks (any TP/PP/VPP); collective.

    Strict: a tensor the model needs that the checkpoint lacks, or a checkpoint tensor the model
    does not have, is an error naming the keys (only `_extra_state` objects may differ).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    ckpt_dir = resolve_checkpoint_dir(ckpt_dir)
    model_cfg, _ = read_model_meta(ckpt_dir)
    _check_architecture(chunks, model_cfg, ckpt_dir)
    model_path = ckpt_dir / MODEL_DIR
    if not (model_path / "metadata.json").is_file():
        raise ValueError(f"{model_path} holds no dist_checkpointing checkpoint (no metadata.json)")
    sharded = _sharded_state_dict(chunks)
    state, ckpt_only, model_only = dist_checkpointing.load(
        sharded, str(model_path), strict=StrictHandling.RETURN_ALL
    )
    ckpt_only = sorted(k for k in ckpt_only if not _is_extra_state(k))
    model_only = sorted(k for k in model_only if not _is_extra_state(k))
    error = None
    if ckpt_only or model_only:
        error = (
            f"checkpoint {ckpt_dir} does not match the model: missing in the checkpoint "
            f"{model_only[:20]}, not in the model {ckpt_only[:20]}"
        )
    _raise_if_any(error)
    states = [state] if len(chunks) == 1 else [state[f"chunk{i}"] for i in range(len(chunks))]
    for chunk, chunk_state in zip(chunks, states, strict=True):
        result = _unwrap(chunk).load_state_dict(chunk_state, strict=False)
        missing = [k for k in result.missing_keys if not _is_extra_state(k)]
        unexpected = [k for k in result.unexpected_keys if not _is_extra_state(k)]
        if missing or unexpected:
            raise ValueError(
                f"loading {ckpt_dir}: parameters not loaded {missing}, unexpected {unexpected}"
            )
