"""Chat templates go through transformers' apply_chat_template: strftime_now, HF's tojson and
template kwargs (Qwen3's enable_thinking) work, and prompts match transformers byte for byte."""

from __future__ import annotations

import json

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
