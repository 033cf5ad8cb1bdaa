"""Prompt datasets (JSONL) and their DP-sharded, resumable order.

One JSON object per line (blank lines are skipped):

    {"id": "gsm8k-17", "prompt": "Natalia sold clips to ...", "answer": "72"}
    {"id": "chat-3", "messages": [{"role": "user", "content": "Hi"}], "response": "Hello!"}
    {"id": "tok-1", "prompt_ids": [12, 7, 99], "response_ids": [5, 6, 1]}

- `prompt` (text) or `messages` (chat turns) is wrapped in the tokenizer's chat template when
  data.chat_template is true; `prompt_ids` is an already tokenized prompt (no tokenizer needed).
- `response` / `response_ids`: a given response, needed by the off-policy and mdlm_sft modes
  (x0 comes from the data there). An end-of-sequence token is appended when missing, so the
  student learns to stop.
- `answer`: kept for evaluation, not used by training.

Every problem is reported with the file and line, before any model is built.

Order: one permutation of the records per epoch (seeded by (seed, epoch)); a rollout step takes
the next `global_batch` records of it and data-parallel rank r takes its contiguous slice. The
position (epoch, index) is the whole state, so a resumed run (at any DP size) sees exactly the
records an uninterrupted run would. A tail shorter than a batch is dropped at each epoch end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt_ids: list[int]
    response_ids: list[int] | None = None
    answer: str | None = None


class PromptDataset:
    """Tokenized prompt records of one JSONL file."""

    def __init__(self, records: list[PromptRecord], source: str):
        self.records = records
        self.source = source

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> PromptRecord:
        return self.records[index]


def iter_jsonl(path: Path):
    """(where "file:line", line number, parsed object) for each non-blank line of a JSONL file."""
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                yield where, line_number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{where}: invalid JSON ({exc.msg} at column {exc.colno})"
                ) from None


def _check_ids(value: Any, name: str, vocab_size: int, where: str) -> list[int]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in value)
    ):
        raise ValueError(f"{where}: '{name}' must be a non-empty list of integer token ids")
    bad = [i for i in value if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(
            f"{where}: '{name}' has token ids {bad[:5]} outside [0, model.vocab_size={vocab_size})"
        )
    return value


def check_messages(value: Any, where: str) -> list[dict[str, str]]:
    """Chat turns of a record ({role, content} dicts); ValueError naming `where` otherwise."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for turn in value:
        if (
            not isinstance(turn, dict)
            or turn.get("role") not in _ROLES
            or not isinstance(turn.get("content"), str)
        ):
            raise ValueError(
                f"{where}: each message needs 'role' (one of {list(_ROLES)}) and a string "
                f"'content'; got {turn!r}"
            )
    return value


def _parse_record(
    raw: Any,
    where: str,
    tokenizer,
    chat_template: bool,
    template_kwargs: dict[str, Any],
    vocab_size: int,
    eos_token_ids: list[int],
    max_prompt_length: int,
    need_response: bool,
    default_id: str,
) -> PromptRecord:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    given = [key for key in ("prompt", "messages", "prompt_ids") if key in raw]
    if len(given) != 1:
        raise ValueError(
            f"{where}: needs exactly one of 'prompt' (text), 'messages' (chat turns) or "
            f"'prompt_ids' (token ids); found {given or 'none'}"
        )
    if given[0] == "prompt_ids":
        prompt_ids = _check_ids(raw["prompt_ids"], "prompt_ids", vocab_size, where)
    else:
        if given[0] == "prompt":
            if not isinstance(raw["prompt"], str) or not raw["prompt"]:
                raise ValueError(f"{where}: 'prompt' must be a non-empty string")
            prompt = raw["prompt"]
        else:
            prompt = check_messages(raw["messages"], where)
        if tokenizer is None:
            raise ValueError(
                f"{where}: '{given[0]}' is text but no tokenizer is configured; set "
                "data.tokenizer (or give pre-tokenized 'prompt_ids')"
            )
        prompt_ids = list(
            tokenizer.encode_prompt(prompt, chat=chat_template, template_kwargs=template_kwargs)
        )
        if not prompt_ids:
            raise ValueError(f"{where}: the prompt tokenizes to nothing")
        _check_ids(prompt_ids, "prompt (tokenized)", vocab_size, where)
    if len(prompt_ids) > max_prompt_length:
        raise ValueError(
            f"{where}: prompt has {len(prompt_ids)} tokens, more than "
            f"data.max_prompt_length={max_prompt_length}; raise it or shorten the prompt"
        )
    response_ids = None
    if "response" in raw and "response_ids" in raw:
        raise ValueError(f"{where}: give 'response' or 'response_ids', not both")
    if "response_ids" in raw:
        response_ids = list(_check_ids(raw["response_ids"], "response_ids", vocab_size, where))
    elif "response" in raw:
        if not isinstance(raw["response"], str) or not raw["response"]:
            raise ValueError(f"{where}: 'response' must be a non-empty string")
        if tokenizer is None:
            raise ValueError(f"{where}: 'response' is text but no tokenizer is configured")
        response_ids = list(tokenizer.encode(raw["response"]))
        _check_ids(response_ids, "response (tokenized)", vocab_size, where)
    if response_ids is not None and response_ids[-1] not in eos_token_ids:
        response_ids.append(eos_token_ids[0])
    if need_response and response_ids is None:
        raise ValueError(
            f"{where}: this mode trains on given responses; add 'response' or 'response_ids'"
        )
    answer = raw.get("answer")
    record_id = raw.get("id", default_id)
    return PromptRecord(
        id=str(record_id),
        prompt_ids=list(prompt_ids),
        response_ids=response_ids,
        answer=None if answer is None else str(answer),
    )


def load_prompts(
    path: str | Path,
    tokenizer=None,
    *,
    vocab_size: int,
    eos_token_ids: list[int],
    max_prompt_length: int,
    chat_template: bool = True,
    chat_template_kwargs: dict[str, Any] | None = None,
    need_response: bool = False,
) -> PromptDataset:
    """Read and tokenize a JSONL prompt file; ValueError naming file and line on bad input.

    `chat_template_kwargs` are variables for the chat template (data.chat_template_kwargs)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file {str(path)!r} does not exist")
    records: list[PromptRecord] = []
    for where, line_number, raw in iter_jsonl(path):
        records.append(
            _parse_record(
                raw,
                where,
                tokenizer,
                chat_template,
                chat_template_kwargs or {},
                vocab_size,
                eos_token_ids,
                max_prompt_length,
                need_response,
                default_id=f"{path.name}:{line_number}",
            )  # fmt: skip
        )
    if not records:
        raise ValueError(f"prompt file {path} holds no records (empty or only blank lines)")
    return PromptDataset(records, str(path))


class PromptOrder:
    """Deterministic epoch-shuffled batches of record indices, sharded over DP ranks."""

    def __init__(self, num_records: int, global_batch: int, seed: int, dp_rank: int, dp_size: int):
        if global_batch % dp_size:
            raise ValueError(
                f"train.prompts_per_rollout={global_batch} is not divisible by the data-parallel "
                f"size {dp_size}"
            )
        if num_records < global_batch:
            raise ValueError(
                f"the prompt dataset has {num_records} records, fewer than "
                f"train.prompts_per_rollout={global_batch}"
            )
        self.num_records = num_records
        self.global_batch = global_batch
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.epoch = 0
        self.index = 0
        self._permutation = self._make_permutation(0)

    def _make_permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_records)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_records // self.global_batch

    def next_global(self) -> list[int]:
        """Indices of the next global batch (all DP ranks), advancing the position."""
        if self.index + self.global_batch > self.num_records:
            self.epoch += 1
            self.index = 0
            self._permutation = self._make_permutation(self.epoch)
        batch = self._permutation[self.index : self.index + self.global_batch]
        self.index += self.global_batch
        return [int(i) for i in batch]

    def next_local(self) -> list[int]:
        """This DP rank's slice of the next global batch."""
        batch = self.next_global()
        per_rank = self.global_batch // self.dp_size
        return batch[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "num_records": self.num_records,
                "seed": self.seed}  # fmt: skip

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_records"] != self.num_records:
            raise ValueError(
                f"the checkpoint's prompt order was over {state['num_records']} records, the "
                f"dataset now has {self.num_records}; resume with the same data.train_prompts"
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self._permutation = self._make_permutation(self.epoch)
