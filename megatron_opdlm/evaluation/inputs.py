"""Evaluation inputs: the bundled held-out prompts and QA set, read and tokenized.

Files are JSONL with the schema of megatron_opdlm/data/bundled/README.md
({"id", "category", "prompt", optional "answer", optional "aliases"}). Prompts are wrapped in the
tokenizer's chat template exactly as training does (`data.tokenizer.Tokenizer.encode_prompt`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_opdlm.data.prompts import iter_jsonl

BUNDLED_DIR = Path(__file__).resolve().parents[1] / "data" / "bundled"
HELDOUT_PROMPTS = BUNDLED_DIR / "prompts_heldout.jsonl"
QA_SET = BUNDLED_DIR / "qa.jsonl"


@dataclass
class EvalItem:
    item: dict  # the JSON record
    prompt_ids: list[int]


def read_jsonl(path: str | Path, limit: int | None = None, need_answer: bool = False) -> list[dict]:
    """The first `limit` records of a JSONL file (all when None), checked for the schema."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"evaluation file {str(path)!r} does not exist")
    if limit is not None and limit < 1:
        raise ValueError(f"asked for {limit} records of {path}; ask for at least 1")
    records = []
    for where, _, record in iter_jsonl(path):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"{where}: expected an object with a text 'prompt'")
        if need_answer and not isinstance(record.get("answer"), str):
            raise ValueError(f"{where}: a QA item needs a text 'answer'")
        records.append(record)
        if limit is not None and len(records) == limit:
            break
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def tokenize(
    records: list[dict],
    tokenizer,
    max_prompt_length: int,
    chat: bool = True,
    template_kwargs: dict | None = None,
):
    """EvalItems with the chat-templated prompt ids (`template_kwargs`: the template's
    variables); an error for a prompt over the limit."""
    items = []
    for record in records:
        ids = list(
            tokenizer.encode_prompt(record["prompt"], chat=chat, template_kwargs=template_kwargs)
        )
        if not ids or len(ids) > max_prompt_length:
            raise ValueError(
                f"prompt {record.get('id', '?')} has {len(ids)} tokens; allowed 1.."
                f"{max_prompt_length} (raise --max-prompt-length)"
            )
        items.append(EvalItem(record, ids))
    return items
