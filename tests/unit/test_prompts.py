"""Prompt JSONL loading (errors name file and line) and the resumable DP-sharded order."""

from __future__ import annotations

import json

import pytest

from megatron_opdlm.data.prompts import PromptOrder, load_prompts

KW = dict(vocab_size=100, eos_token_ids=[1], max_prompt_length=16)


def _write(tmp_path, lines):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_loads_token_ids_and_appends_eos(tmp_path):
    path = _write(tmp_path, [
        json.dumps({"id": "a", "prompt_ids": [5, 6], "response_ids": [7, 8], "answer": 3}),
        "",
        json.dumps({"prompt_ids": [9], "response_ids": [4, 1]}),
    ])  # fmt: skip
    data = load_prompts(path, **KW, need_response=True)
    assert len(data) == 2
    assert data[0].id == "a" and data[0].answer == "3"
    assert data[0].response_ids == [7, 8, 1]  # EOS appended so the student learns to stop
    assert data[1].response_ids == [4, 1]  # already ends with EOS
    assert data[1].id == "p.jsonl:3"


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"id": "x"}), "needs exactly one of 'prompt'"),
        (json.dumps({"prompt_ids": [1], "prompt": "hi"}), "needs exactly one of"),
        (json.dumps({"prompt_ids": [5, 200]}), "outside [0, model.vocab_size=100)"),
        (json.dumps({"prompt_ids": []}), "non-empty list of integer token ids"),
        (json.dumps({"prompt_ids": list(range(2, 30))}), "data.max_prompt_length=16"),
        (json.dumps({"prompt": "hello"}), "no tokenizer is configured"),
        (json.dumps({"messages": [{"role": "x", "content": "c"}]}), "each message needs 'role'"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, message):
    path = _write(tmp_path, [json.dumps({"prompt_ids": [3]}), line])
    with pytest.raises(ValueError) as info:
        load_prompts(path, **KW)
    assert f"{path}:2" in str(info.value)
    assert message in str(info.value)


def test_missing_response_for_response_modes(tmp_path):
    path = _write(tmp_path, [json.dumps({"prompt_ids": [3], "response_ids": [4]}),
                             json.dumps({"prompt_ids": [3]})])  # fmt: skip
    load_prompts(path, **KW)  # fine for on-policy modes
    with pytest.raises(ValueError, match=r"p.jsonl:2: this mode trains on given responses"):
        load_prompts(path, **KW, need_response=True)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="holds no records"):
        load_prompts(_write(tmp_path, ["", "  "]), **KW)
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(tmp_path / "nope.jsonl", **KW)


class _CharTokenizer:
    """Stands in for data.tokenizer.Tokenizer: one id per character, a fake chat template."""

    def encode(self, text, add_special_tokens=False):
        return [2 + ord(c) % 90 for c in text]

    def encode_prompt(self, prompt, chat=True, template_kwargs=None):
        text = prompt if isinstance(prompt, str) else "|".join(m["content"] for m in prompt)
        return self.encode(f"<u>{text}<a>" if chat else text)


def test_text_prompts_go_through_the_tokenizer(tmp_path):
    path = _write(tmp_path, [
        json.dumps({"prompt": "ab", "response": "c"}),
        json.dumps({"messages": [{"role": "user", "content": "ab"}]}),
    ])  # fmt: skip
    data = load_prompts(path, _CharTokenizer(), **KW)
    tok = _CharTokenizer()
    assert data[0].prompt_ids == tok.encode("<u>ab<a>") == data[1].prompt_ids
    assert data[0].response_ids == tok.encode("c") + [1]
    plain = load_prompts(path, _CharTokenizer(), **KW, chat_template=False)
    assert plain[0].prompt_ids == tok.encode("ab")


def test_order_is_a_permutation_per_epoch_and_shards_over_dp():
    order = PromptOrder(10, global_batch=4, seed=3, dp_rank=0, dp_size=1)
    epoch0 = order.next_global() + order.next_global()
    assert len(set(epoch0)) == 8  # no repeats inside an epoch; the tail of 2 is dropped
    first_of_epoch1 = order.next_global()
    assert order.epoch == 1 and len(set(first_of_epoch1)) == 4
    # DP shards of one global batch are disjoint and cover it, in order
    shards = []
    for rank in range(2):
        sharded = PromptOrder(10, global_batch=4, seed=3, dp_rank=rank, dp_size=2)
        shards.append(sharded.next_local())
    reference = PromptOrder(10, global_batch=4, seed=3, dp_rank=0, dp_size=1).next_global()
    assert shards[0] + shards[1] == reference


def test_order_resumes_exactly():
    straight = PromptOrder(13, global_batch=4, seed=5, dp_rank=0, dp_size=1)
    want = [straight.next_global() for _ in range(7)]
    first = PromptOrder(13, global_batch=4, seed=5, dp_rank=0, dp_size=1)
    got = [first.next_global() for _ in range(4)]
    resumed = PromptOrder(13, global_batch=4, seed=5, dp_rank=0, dp_size=1)
    resumed.load_state_dict(first.state_dict())
    got += [resumed.next_global() for _ in range(3)]
    assert got == want
    with pytest.raises(ValueError, match="resume with the same data.train_prompts"):
        PromptOrder(12, 4, 5, 0, 1).load_state_dict(first.state_dict())


def test_order_refuses_impossible_batches():
    with pytest.raises(ValueError, match="fewer than train.prompts_per_rollout=8"):
        PromptOrder(5, global_batch=8, seed=0, dp_rank=0, dp_size=1)
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 4"):
        PromptOrder(50, global_batch=6, seed=0, dp_rank=0, dp_size=4)
