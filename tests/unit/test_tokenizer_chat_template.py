"""Chat templates go through transformers' apply_chat_template: strftime_now, HF's tojson and
template kwargs (Qwen3's enable_thinking) work, and prompts match transformers byte for byte.
Template kwargs are configured by data.chat_template_kwargs (training) and
--chat-template-kwargs (tools/generate.py, tools/evaluate.py), checked, and reach the template."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from megatron_opdlm.data.tokenizer import load_tokenizer
from tests.unit.test_evaluation_support import write_char_tokenizer

# The constructs of real templates that a bare jinja2 environment lacks: Llama-3.1's
# strftime_now date line, tool schemas through HF's tojson, Qwen3's enable_thinking switch.
TEMPLATE = (
    "{{ bos_token }}Today: {{ strftime_now('%Y') }}\n"
    "{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    "{% endif %}"
)


def test_template_with_strftime_tojson_and_kwargs(tmp_path):
    from transformers import AutoTokenizer

    directory = write_char_tokenizer(tmp_path / "tok")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.update(chat_template=TEMPLATE, bos_token="<s>")
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(directory)
    messages = [{"role": "user", "content": "Hi"}]
    tools = [{"name": "add", "description": "a + b"}]
    # strftime_now alone (as Llama-3.1's template uses it) failed with a bare jinja2 environment
    assert tokenizer.apply_chat_template(messages).startswith("<s>Today: 2")
    text = tokenizer.apply_chat_template(messages, enable_thinking=False, tools=tools)
    assert text.startswith("<s>Today: 2") and text.endswith("<|assistant|><think></think>")
    assert 'Tools: [{"name": "add", "description": "a + b"}]' in text
    reference = AutoTokenizer.from_pretrained(str(directory)).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False, tools=tools
    )
    assert text == reference
    ids = tokenizer.encode_prompt(messages, template_kwargs={"enable_thinking": False})
    assert tokenizer.decode(ids, skip_special_tokens=False).endswith("<think></think>")


# --- data.chat_template_kwargs and the tools' --chat-template-kwargs reach the template ---
# A Qwen3-like switch: the generation prompt ends in "/no_think" only when enable_thinking=false.
THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>"
    "{% if enable_thinking is defined and not enable_thinking %}/no_think{% endif %}{% endif %}"
)
ROOT = Path(__file__).resolve().parents[2]


def think_tokenizer_dir(tmp_path) -> Path:
    directory = write_char_tokenizer(tmp_path / "tok")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": THINK_TEMPLATE})
    )
    return directory


def ends_without_thinking(tokenizer, ids) -> bool:
    return tokenizer.decode(ids, skip_special_tokens=False).endswith("<|im_start|>/no_think")


def test_config_field_from_overrides_and_yaml(tmp_path):
    from megatron_opdlm.config import config_help, load_config

    one_key = load_config(None, ["data.chat_template_kwargs.enable_thinking=false"])
    assert one_key.data.chat_template_kwargs == {"enable_thinking": False}
    two = load_config(
        None, ["data.chat_template_kwargs.enable_thinking=false", "data.chat_template_kwargs.x=1"]
    )
    assert two.data.chat_template_kwargs == {"enable_thinking": False, "x": 1}
    whole = load_config(None, ["data.chat_template_kwargs={enable_thinking: true}"])
    assert whole.data.chat_template_kwargs == {"enable_thinking": True}
    path = tmp_path / "job.yaml"
    path.write_text("data:\n  chat_template_kwargs:\n    enable_thinking: false\n")
    from_yaml = load_config(str(path), ["data.chat_template_kwargs.reasoning=low"])
    assert from_yaml.data.chat_template_kwargs == {"enable_thinking": False, "reasoning": "low"}
    assert load_config(None, []).data.chat_template_kwargs == {}
    assert "data.chat_template_kwargs (default {})" in config_help()


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["data.chat_template_kwargs=true"], "data.chat_template_kwargs: expected a mapping"),
        (["data.chat_template_kwargs=[1, 2]"], "expected a mapping"),
        (["data.chat_template_kwargs.tokenize=true"], "'tokenize' is an argument of apply_chat"),
        (["data.chat_template_kwargs={1: x}"], "key 1 is not a template variable name"),
        (
            ["data.chat_template=false", "data.chat_template_kwargs.enable_thinking=false"],
            "data.chat_template=false, so no template would read them",
        ),
    ],
)
def test_config_field_refuses_bad_values(overrides, match):
    from megatron_opdlm.config import load_config

    with pytest.raises(ValueError, match=re.escape(match)):
        load_config(None, overrides)


def test_yaml_non_mapping_is_refused(tmp_path):
    from megatron_opdlm.config import load_config

    path = tmp_path / "job.yaml"
    path.write_text("data:\n  chat_template_kwargs: enable_thinking\n")
    with pytest.raises(ValueError, match="data.chat_template_kwargs: expected a mapping"):
        load_config(str(path))


def test_training_prompt_loader_passes_the_kwargs(tmp_path):
    from megatron_opdlm.training.setup import load_datasets
    from tests.tiny import tiny_config

    tokenizer = load_tokenizer(think_tokenizer_dir(tmp_path))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n{"messages": [{"role": "user", "content": "Yo"}]}\n')
    common = [f"data.train_prompts={prompts}", "model.vocab_size=120"]
    off = tiny_config(*common, "data.chat_template_kwargs.enable_thinking=false")
    train, _ = load_datasets(off, tokenizer)
    assert all(ends_without_thinking(tokenizer, train[i].prompt_ids) for i in range(2))
    default, _ = load_datasets(tiny_config(*common), tokenizer)
    assert not any(ends_without_thinking(tokenizer, default[i].prompt_ids) for i in range(2))


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_tool_passes_the_kwargs(tmp_path):
    generate = _tool("generate")
    tokenizer = load_tokenizer(think_tokenizer_dir(tmp_path))
    for flags in (["enable_thinking=false"], ["{enable_thinking: false}"]):
        argv = ["--ckpt", "x", "--prompt", "Hi", "--chat", "--chat-template-kwargs", *flags]
        args = generate.parse_args(argv)
        kwargs = generate.chat_template_kwargs(args)
        assert kwargs == {"enable_thinking": False}
        (ids,) = generate.encode_prompts(tokenizer, ["Hi"], args.chat, kwargs)
        assert ends_without_thinking(tokenizer, ids)
    (ids,) = generate.encode_prompts(tokenizer, ["Hi"], True, {})
    assert not ends_without_thinking(tokenizer, ids)
    args = generate.parse_args(["--ckpt", "x", "--prompt", "Hi", "--chat-template-kwargs", "a=1"])
    with pytest.raises(ValueError, match="--chat-template-kwargs: is given without --chat"):
        generate.chat_template_kwargs(args)


def test_evaluate_tool_passes_the_kwargs(tmp_path):
    from megatron_opdlm.evaluation import inputs

    evaluate = _tool("evaluate")
    tokenizer = load_tokenizer(think_tokenizer_dir(tmp_path))
    args = evaluate.parse_args(
        ["--teacher", str(tmp_path), "--chat-template-kwargs", "enable_thinking=false"]
    )
    evaluate.check_args(args)
    assert args.template_kwargs == {"enable_thinking": False}
    (item,) = inputs.tokenize([{"id": "a", "prompt": "Hi"}], tokenizer, 64,
                              template_kwargs=args.template_kwargs)  # fmt: skip
    assert ends_without_thinking(tokenizer, item.prompt_ids)
    (plain,) = inputs.tokenize([{"id": "a", "prompt": "Hi"}], tokenizer, 64)
    assert not ends_without_thinking(tokenizer, plain.prompt_ids)


@pytest.mark.parametrize(
    "texts,match",
    [
        (["enable_thinking"], "is not a mapping; write KEY=VALUE"),
        (["{enable_thinking: [}"], "is not a YAML mapping"),
        (["messages=[]"], "'messages' is an argument of apply_chat_template"),
        (["not-a-name=1"], "key 'not-a-name' is not a template variable name"),
    ],
)
def test_command_line_kwargs_refuse_bad_text(texts, match):
    from megatron_opdlm.data.tokenizer import parse_template_kwargs

    with pytest.raises(ValueError, match=re.escape(match)):
        parse_template_kwargs(texts, "--chat-template-kwargs")
