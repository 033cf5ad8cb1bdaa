"""Turn an exported student's HF directory into a DLM that transformers loads and decodes.

The safetensors keep the family's tensor names and shapes (conversion.megatron_to_hf writes
them); this module rewrites config.json to declare the student's own model_type and architecture
(`opdlm_llama` / `OpdlmLlamaForCausalLM`, ...) resolved through `auto_map` to the remote code in
remote_code/ (copied next to the weights), records the decoding defaults, and writes a model
card. Loading without trust_remote_code then fails instead of decoding the student as AR.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from megatron_opdlm.config import DiffusionConfig, ModelConfig

REMOTE_CODE_DIR = Path(__file__).resolve().parent / "remote_code"
REMOTE_FILES = ("configuration_opdlm.py", "modeling_opdlm.py", "generation_opdlm.py",
                "block_diffusion.py")  # fmt: skip
# family -> (config class, model class, model_type) of the remote code
REMOTE_CLASSES = {
    "llama": ("OpdlmLlamaConfig", "OpdlmLlamaForCausalLM", "opdlm_llama"),
    "qwen2": ("OpdlmQwen2Config", "OpdlmQwen2ForCausalLM", "opdlm_qwen2"),
    "qwen3": ("OpdlmQwen3Config", "OpdlmQwen3ForCausalLM", "opdlm_qwen3"),
    "mistral": ("OpdlmMistralConfig", "OpdlmMistralForCausalLM", "opdlm_mistral"),
}
# transformers versions the remote code is tested with (tests/functional/test_hf_export_smollm2)
TESTED_TRANSFORMERS = ">=5.0,<6"


def default_decoding(block_size: int, trainer_config: Path | None = None) -> dict:
    """The evaluation's quality setting (greedy, static, one token per round); the dynamic
    threshold of the training run when its config.yaml is at hand."""
    threshold = 0.9
    if trainer_config is not None and trainer_config.is_file():
        rollout = (yaml.safe_load(trainer_config.read_text()) or {}).get("rollout") or {}
        threshold = float(rollout.get("threshold", threshold))
    return {
        "remasking": "static",
        "threshold": threshold,
        "steps_per_block": block_size,
        "temperature": 0.0,
        "top_k": 0,
        "top_p": 1.0,
        "max_new_tokens": 64,
    }


def check_decoding(decoding: dict, block_size: int) -> None:
    if decoding["remasking"] not in ("static", "dynamic"):
        raise ValueError(f"--remasking {decoding['remasking']!r}: choose static or dynamic")
    if not 0.0 < decoding["threshold"] <= 1.0:
        raise ValueError(f"--threshold {decoding['threshold']} must be in (0, 1]")
    if not 1 <= decoding["steps_per_block"] <= block_size:
        raise ValueError(
            f"--steps-per-block {decoding['steps_per_block']} must be in [1, block size "
            f"{block_size}]"
        )


def write_dlm_files(
    out_dir: Path, model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, decoding: dict
) -> None:
    """Rewrite out_dir/config.json as a DLM, copy the remote code, write README.md."""
    config_class, model_class, model_type = REMOTE_CLASSES[model_cfg.family]
    check_decoding(decoding, diffusion_cfg.block_size)
    path = out_dir / "config.json"
    hf = json.loads(path.read_text())
    hf["architectures"] = [model_class]
    hf["model_type"] = model_type
    hf["auto_map"] = {
        "AutoConfig": f"configuration_opdlm.{config_class}",
        "AutoModelForCausalLM": f"modeling_opdlm.{model_class}",
    }
    hf["opdlm"] = {**hf["opdlm"], "family": model_cfg.family, "decoding": dict(decoding)}
    path.write_text(json.dumps(hf, indent=2))
    for name in REMOTE_FILES:
        shutil.copy2(REMOTE_CODE_DIR / name, out_dir / name)
    (out_dir / "README.md").write_text(model_card(model_cfg, diffusion_cfg, decoding))


def model_card(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, decoding: dict) -> str:
    _, model_class, model_type = REMOTE_CLASSES[model_cfg.family]
    shift = "on (position i is predicted from i - 1)" if diffusion_cfg.token_shift else "off"
    default = (
        f"{decoding['remasking']}, {decoding['steps_per_block']} steps per block, greedy "
        f"(dynamic threshold {decoding['threshold']:g})"
    )
    return f"""---
library_name: transformers
tags:
- block-diffusion
- opdlm
- custom_generate
---
# Block-diffusion LM (OPDLM student, {model_cfg.family})

A block-diffusion language model converted from an autoregressive {model_cfg.family} model by
on-policy distillation (OPDLM) with megatron-opdlm. The weights keep the family's tensor names and
shapes, but it is **not** an autoregressive model: it decodes {diffusion_cfg.block_size} tokens
per block, several per forward pass. Its model type `{model_type}` (`{model_class}`) is remote
code shipped here (torch + transformers {TESTED_TRANSFORMERS} only); loading it without
`trust_remote_code=True` fails on purpose.

| setting | value |
| --- | --- |
| block size | {diffusion_cfg.block_size} |
| mask token id | {model_cfg.student_mask_token_id} |
| token shift | {shift} |
| default decoding | {default} |

## Usage
```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained(path)
tok.padding_side = "left"  # batches must be left-padded
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
messages = [[{{"role": "user", "content": "What is the capital of France?"}}]]
text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
batch = tok(text, return_tensors="pt", padding=True, add_special_tokens=False)
out = model.generate(**batch, max_new_tokens=32)                       # greedy, static
out = model.generate(**batch, max_new_tokens=32, remasking="dynamic", threshold=0.9)  # faster
out = model.generate(**batch, max_new_tokens=32, do_sample=True, temperature=0.7, top_p=0.9)
print(tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True))
```
`generate` also takes `use_cache=False`, `stop_strings=[...]` with `tokenizer=tok`,
`stopping_criteria`, a `streamer` (batch 1, one put per committed block), `generator=` for
reproducible sampling, and `return_dict_in_generate=True` (with `output_logits` /
`output_scores`: the logits of the round that unmasked each token; `num_forwards` per row).

Score it with lm-evaluation-harness through megatron-opdlm's backend:
`python -m megatron_opdlm.evaluation.lm_eval_cli --model opdlm --model_args pretrained=PATH
--tasks ...`.
"""
