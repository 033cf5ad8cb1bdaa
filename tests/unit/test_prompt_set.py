"""The bundled prompt set: reproducible from tools/make_prompt_set.py, schema, splits, sizes."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "megatron_opdlm" / "data" / "bundled"
FILES = ("prompts_train.jsonl", "prompts_heldout.jsonl", "qa.jsonl")


def _generator():
    spec = importlib.util.spec_from_file_location(
        "make_prompt_set", ROOT / "tools" / "make_prompt_set.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen():
    return _generator()


@pytest.fixture(scope="module")
def files():
    return {
        name: [json.loads(line) for line in (BUNDLED / name).read_text().splitlines()]
        for name in FILES
    }


def test_committed_files_are_what_the_generator_makes(gen):
    built = gen.build(3000, 300, gen.SEED)
    assert gen.check(built, BUNDLED) == [], "run python tools/make_prompt_set.py and commit"
    assert gen.build(3000, 300, gen.SEED) == built  # deterministic within a process too
    other = gen.build(3000, 300, gen.SEED + 1)
    assert other["prompts_train.jsonl"] != built["prompts_train.jsonl"]  # the seed matters


def test_schema_sizes_and_budget(files):
    assert len(files["prompts_train.jsonl"]) == 3000
    assert len(files["prompts_heldout.jsonl"]) == 300
    assert 100 <= len(files["qa.jsonl"]) <= 250
    assert sum((BUNDLED / name).stat().st_size for name in FILES) < 2 * 1024 * 1024
    ids = set()
    for records in files.values():
        for record in records:
            assert set(record) <= {"id", "category", "prompt", "answer", "aliases"}, record
            assert isinstance(record["prompt"], str) and record["prompt"].strip()
            assert isinstance(record["category"], str)
            assert isinstance(record.get("answer", ""), str)
            assert all(isinstance(a, str) for a in record.get("aliases", []))
            assert record["id"] not in ids
            ids.add(record["id"])
    assert all("answer" in r for r in files["qa.jsonl"])


def test_splits_are_disjoint_and_categories_balanced(files, gen):
    train = {r["prompt"] for r in files["prompts_train.jsonl"]}
    heldout = {r["prompt"] for r in files["prompts_heldout.jsonl"]}
    qa = {r["prompt"] for r in files["qa.jsonl"]}
    assert len(train) == 3000 and len(heldout) == 300  # no duplicates inside a split
    assert not train & heldout and not qa & (train | heldout)
    for name in ("prompts_train.jsonl", "prompts_heldout.jsonl"):
        records = files[name]
        for category, share in gen.CATEGORY_SHARES.items():
            fraction = sum(r["category"] == category for r in records) / len(records)
            assert abs(fraction - share) < 0.06, (name, category, fraction)


def test_math_answers_follow_from_the_numbers(files):
    pattern = re.compile(r"has (\d+) .*buys (\d+) more")
    checked = 0
    for record in files["prompts_train.jsonl"]:
        match = pattern.search(record["prompt"])
        if match:
            assert int(record["answer"]) == int(match.group(1)) + int(match.group(2))
            checked += 1
    assert checked > 10


def test_qa_items_cannot_be_answered_by_echoing_the_question(files, gen):
    for record in files["qa.jsonl"]:
        gen.check_qa_item(record)
    with pytest.raises(ValueError, match="repeating the question scores as correct"):
        gen.check_qa_item({"prompt": "Is Paris the capital of France?", "answer": "Paris"})


def test_prompts_load_with_the_trainers_loader(tmp_path):
    from megatron_opdlm.data.prompts import load_prompts
    from megatron_opdlm.data.tokenizer import load_tokenizer
    from tests.unit.test_evaluation_support import write_char_tokenizer

    tokenizer = load_tokenizer(write_char_tokenizer(tmp_path / "tok"))
    data = load_prompts(
        BUNDLED / "prompts_heldout.jsonl",
        tokenizer,
        vocab_size=120,
        eos_token_ids=[1],
        max_prompt_length=1024,
    )
    assert len(data) == 300
    first = json.loads((BUNDLED / "prompts_heldout.jsonl").read_text().splitlines()[0])
    assert data[0].id == first["id"]
    assert tokenizer.decode(data[0].prompt_ids) == first["prompt"]  # the template is special tokens
