"""Local lm-eval tasks over the bundled QA set (offline: the data ships with the package).

- opdlm_qa: generate_until, scored by the project's exact-match rule (evaluation.scoring), the
  same numbers as tools/evaluate.py's QA accuracy.
- opdlm_qa_mc: multiple choice (loglikelihood): the reference answer against three answers of
  other items of the same category (deterministic choice).
`--metadata '{"qa_path": "FILE.jsonl"}'` points both at another file of the same schema.
"""

from __future__ import annotations

import json
from pathlib import Path

QA_PATH = Path(__file__).resolve().parents[2] / "data" / "bundled" / "qa.jsonl"


def _records(qa_path: str | None = None) -> list[dict]:
    path = Path(qa_path) if qa_path else QA_PATH
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_qa(qa_path: str | None = None, **_):
    import datasets

    rows = [{"id": r["id"], "category": r.get("category", "qa"), "prompt": r["prompt"],
             "answer": r["answer"], "aliases": list(r.get("aliases", []))}
            for r in _records(qa_path)]  # fmt: skip
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_qa_mc(qa_path: str | None = None, **_):
    import datasets

    records = _records(qa_path)
    by_category: dict[str, list[str]] = {}
    for r in records:
        answers = by_category.setdefault(r.get("category", "qa"), [])
        if r["answer"] not in answers:
            answers.append(r["answer"])
    rows = []
    for index, r in enumerate(records):
        others = [a for a in by_category[r.get("category", "qa")] if a != r["answer"]]
        if len(others) < 3:
            continue
        start = index % len(others)
        distractors = [others[(start + k) % len(others)] for k in range(3)]
        gold = index % 4
        choices = distractors[:gold] + [r["answer"]] + distractors[gold:]
        rows.append({"id": r["id"], "prompt": r["prompt"], "choices": choices, "gold": gold})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_qa(doc: dict, results: list[str]) -> dict:
    from megatron_opdlm.evaluation.scoring import is_correct

    return {"exact_match": float(is_correct(results[0], doc["answer"], doc["aliases"]))}
