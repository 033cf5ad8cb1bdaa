"""Shared set-up for the evaluation tests: a character-level HF tokenizer with a chat template,
tiny random teacher checkpoints, and EvalModels built in this process.

The tokenizer is a real `tokenizers` file (data.tokenizer.load_tokenizer reads it), so the CLI
runs exactly as on SmolLM2: ids 0 pad, 1 end of sequence, 2 start of turn, 3 unknown, then one id
per printable ASCII character (99 ids, under the tiny models' vocabulary of 120).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.tiny import tiny_config

SPECIALS = ["<pad>", "<|im_end|>", "<|im_start|>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>{% endif %}"
)


def write_char_tokenizer(directory: Path) -> Path:
    from tokenizers import AddedToken, Tokenizer, decoders
    from tokenizers.models import BPE

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    tokenizer.decoder = decoders.Fuse()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def tiny_teacher_job(*overrides: str):
    """Tiny fp32 Llama config whose eos/pad match the character tokenizer."""
    return tiny_config(
        "model.init_method_std=0.3",
        "model.max_position_embeddings=512",
        "model.eos_token_ids=[1]",
        "model.pad_token_id=0",
        *overrides,
    )


def save_tiny_teacher(directory: Path, tokenizer_dir: Path | None, seed: int = 0, job=None) -> Path:
    """Random tiny AR teacher saved as a converter-format checkpoint (needs parallel state)."""
    from megatron_opdlm.checkpoint_layout import save_model_checkpoint
    from megatron_opdlm.models.builder import build_teacher

    job = job or tiny_teacher_job()
    torch.manual_seed(seed)
    save_model_checkpoint(build_teacher(job), directory, job.model, None, tokenizer_dir)
    return directory


def tiny_eval_models(block_size: int = 4, token_shift: bool = False, seed: int = 0):
    """(teacher as AR EvalModel, student EvalModel with the teacher's weights, job)."""
    from megatron_opdlm.config import DiffusionConfig
    from megatron_opdlm.evaluation.models import from_chunks, job_for
    from megatron_opdlm.models.builder import build_student, build_teacher, copy_weights

    job = tiny_teacher_job()
    torch.manual_seed(seed)
    source = build_teacher(job)
    diffusion = DiffusionConfig(block_size=block_size, token_shift=token_shift)
    teacher_chunks = build_student(job_for(job.model, DiffusionConfig(1, True)))
    student_chunks = build_student(job_for(job.model, diffusion))
    copy_weights(source, teacher_chunks)
    copy_weights(source, student_chunks)
    for chunk in teacher_chunks + student_chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    teacher = from_chunks("teacher", teacher_chunks, job.model, None)
    student = from_chunks("student", student_chunks, job.model, diffusion)
    return teacher, student, job


def random_prompts(count: int, seed: int = 0, low: int = 4, high: int = 98) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 10, (count,), generator=generator).tolist()
    return [torch.randint(low, high, (n,), generator=generator).tolist() for n in lengths]
