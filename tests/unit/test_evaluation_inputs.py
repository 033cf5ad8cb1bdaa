"""Evaluation inputs: JSONL reading and its errors, tokenization limits, recorded token counts."""

from __future__ import annotations

import json

import pytest

from megatron_opdlm.evaluation import inputs
from megatron_opdlm.evaluation.models import training_tokens_of


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_jsonl_takes_a_prefix_and_skips_blank_lines(tmp_path):
    path = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": f"q{i}"}) for i in range(5)] + [""])
    assert [r["prompt"] for r in inputs.read_jsonl(path, 2)] == ["q0", "q1"]
    assert len(inputs.read_jsonl(path)) == 5


def test_bundled_defaults_exist():
    assert len(inputs.read_jsonl(inputs.QA_SET, 3, need_answer=True)) == 3
    assert len(inputs.read_jsonl(inputs.HELDOUT_PROMPTS, 3)) == 3


@pytest.mark.parametrize(
    "lines, need_answer, message",
    [
        (['{"prompt": "a"}', "{oops"], False, r"p.jsonl:2: invalid JSON"),
        (['{"text": "a"}'], False, r"p.jsonl:1: expected an object with a text 'prompt'"),
        (['{"prompt": "a"}'], True, r"p.jsonl:1: a QA item needs a text 'answer'"),
        ([""], False, "holds no records"),
    ],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path, lines, need_answer, message):
    path = _write(tmp_path / "p.jsonl", lines)
    with pytest.raises(ValueError, match=message):
        inputs.read_jsonl(path, need_answer=need_answer)


def test_read_jsonl_missing_file_and_bad_limit(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        inputs.read_jsonl(tmp_path / "none.jsonl")
    path = _write(tmp_path / "p.jsonl", ['{"prompt": "a"}'])
    with pytest.raises(ValueError, match="ask for at least 1"):
        inputs.read_jsonl(path, 0)


class _Tokenizer:
    def encode_prompt(self, prompt, chat=True, template_kwargs=None):
        return [3] * (len(prompt) + (2 if chat else 0))


def test_tokenize_applies_the_chat_template_and_the_length_limit():
    items = inputs.tokenize([{"id": "a", "prompt": "abc"}], _Tokenizer(), max_prompt_length=5)
    assert items[0].prompt_ids == [3] * 5 and items[0].item["id"] == "a"
    with pytest.raises(ValueError, match="prompt b has 6 tokens; allowed 1..5"):
        inputs.tokenize([{"id": "b", "prompt": "abcd"}], _Tokenizer(), max_prompt_length=5)


def test_training_tokens_come_from_the_trainer_state(tmp_path):
    assert training_tokens_of(tmp_path) is None
    (tmp_path / "trainer_state.json").write_text(json.dumps({"optimizer_step": 3}))
    assert training_tokens_of(tmp_path) is None
    (tmp_path / "trainer_state.json").write_text(json.dumps({"training_tokens": 12345}))
    assert training_tokens_of(tmp_path) == 12345
