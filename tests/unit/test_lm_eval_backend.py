"""The lm-eval backend refuses bad model arguments with one line naming them, before loading, and
passes chat_template_kwargs / enable_thinking to the chat template."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is the optional extra [eval]")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "pretrained=DIR is required"),
        ({"pretrained": "/nonexistent/dir"}, "is not a directory"),
        ({"pretrained": ".", "batch_size": "auto"}, "batch_size=auto"),
        ({"pretrained": ".", "dtype": "int8"}, "dtype='int8'"),
        ({"pretrained": ".", "max_gen_toks": 0}, "max_gen_toks=0"),
        ({"pretrained": ".", "temprature": 0.5}, "unknown model_args"),
        ({"chat_template_kwargs": "thinking"}, "chat_template_kwargs 'thinking' is not a mapping"),
        ({"chat_template_kwargs": [1]}, "chat_template_kwargs must be a mapping"),
        ({"chat_template_kwargs": {"tokenize": True}}, "'tokenize' is an argument"),
        ({"enable_thinking": "maybe"}, "enable_thinking='maybe': use true or false"),
    ],
)
def test_bad_model_args(kwargs, match):
    from megatron_opdlm.evaluation.lm_eval_backend import OpdlmLM

    with pytest.raises(ValueError, match=match):
        OpdlmLM(**kwargs)


@pytest.mark.slow
def test_cli_answers_a_bad_checkpoint_in_one_line(tmp_path):
    command = [sys.executable, "-m", "megatron_opdlm.evaluation.lm_eval_cli", "--model", "opdlm",
               "--model_args", f"pretrained={tmp_path / 'missing'}", "--tasks", "opdlm_qa",
               "--include_path", str(ROOT / "megatron_opdlm/evaluation/lm_eval_tasks")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: pretrained='{tmp_path / 'missing'}' is not a directory"
    )
    assert "Traceback" not in done.stderr


def test_chat_template_kwargs_reach_the_template(tmp_path):
    from megatron_opdlm.checkpoint_layout import read_model_meta, write_model_meta
    from megatron_opdlm.config import DiffusionConfig
    from megatron_opdlm.conversion.hf_to_megatron import convert_hf_to_megatron
    from megatron_opdlm.conversion.megatron_to_hf import convert_megatron_to_hf
    from megatron_opdlm.conversion.synthetic import save_tiny_hf
    from megatron_opdlm.evaluation.lm_eval_backend import OpdlmLM
    from tests.unit.test_tokenizer_chat_template import think_tokenizer_dir

    hf = save_tiny_hf("llama", tmp_path / "hf")  # eos 1 / pad 0, as the character tokenizer
    for file in think_tokenizer_dir(tmp_path).iterdir():
        (hf / file.name).write_bytes(file.read_bytes())
    ckpt = tmp_path / "ckpt"
    convert_hf_to_megatron(hf, ckpt)
    model_cfg, _ = read_model_meta(ckpt)
    write_model_meta(ckpt, model_cfg, DiffusionConfig(block_size=4, token_shift=False))
    convert_megatron_to_hf(ckpt, tmp_path / "dlm")
    history = [{"role": "user", "content": "Hi"}]
    for args in (
        {"chat_template_kwargs": {"enable_thinking": False}},
        {"enable_thinking": "false"},
    ):
        lm = OpdlmLM(pretrained=str(tmp_path / "dlm"), **args)
        assert lm.apply_chat_template(history) == "<|im_start|>Hi<|im_end|><|im_start|>/no_think"
        assert lm.get_model_info()["opdlm_chat_template_kwargs"] == {"enable_thinking": False}
    plain = OpdlmLM(pretrained=str(tmp_path / "dlm")).apply_chat_template(history)
    assert plain == "<|im_start|>Hi<|im_end|><|im_start|>"
