"""Config loading, overrides and validation errors (each asserts its message)."""

from __future__ import annotations

import pytest

from megatron_opdlm.config import JobConfig, config_help, load_config
from megatron_opdlm.config_base import save_yaml
from tests.tiny import tiny_config


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model:\n  num_layers: 4\nrollout:\n  threshold: 0.8\n")
    config = load_config(str(path), ["rollout.threshold=0.7", "model.eos_token_ids=[1, 2]"])
    assert config.model.num_layers == 4
    assert config.rollout.threshold == 0.7
    assert config.model.eos_token_ids == [1, 2]


def test_saved_config_round_trips(tmp_path):
    config = tiny_config("parallel.tp=2", "diffusion.token_shift=true")
    save_yaml(config, tmp_path / "resolved.yaml")
    assert load_config(str(tmp_path / "resolved.yaml")) == config


def test_help_lists_documented_fields():
    text = config_help()
    assert "model.num_query_groups" in text and "key/value heads" in text
    assert "[rollout]" in text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.tp=3"], "model.num_attention_heads=4 is not divisible by parallel.tp=3"),
        (
            ["model.num_attention_heads=8", "parallel.tp=4"],
            "model.num_query_groups=2 (kv heads) is not divisible by parallel.tp=4",
        ),
        (
            ["model.num_layers=3", "parallel.pp=2"],
            "model.num_layers=3 is not divisible by parallel.pp=2",
        ),
        (
            ["model.num_layers=4", "parallel.pp=2", "parallel.vpp=4"],
            "model.num_layers=4 is not divisible by parallel.pp=2 x parallel.vpp=4",
        ),
        (
            [
                "model.vocab_pad_multiple=11",
                "model.num_attention_heads=2",
                "model.num_query_groups=2",
                "parallel.tp=2",
            ],
            "padded vocabulary 121",
        ),
        (
            ["rollout.max_new_tokens=10"],
            "rollout.max_new_tokens=10 is not a multiple of diffusion.block_size=4",
        ),
        (["rollout.steps_per_block=8"], "rollout.steps_per_block=8 exceeds diffusion.block_size=4"),
        (["precision.fp8=e4m3"], "precision.fp8=e4m3 needs Transformer Engine layers"),
        (
            ["model.num_query_groups=3"],
            "model.num_attention_heads=4 must be a multiple of model.num_query_groups=3",
        ),
        (["model.mask_token_id=500"], "model.mask_token_id=500 is outside the padded vocabulary"),
        (["rollout.threshold=0"], "rollout.threshold=0.0 must be in (0, 1]"),
        (["parallel.vpp=2"], "parallel.vpp=2 needs parallel.pp >= 2"),
        (["model.eos_token_ids=[999]"], "special token id 999 is outside model.vocab_size=120"),
    ],
)
def test_bad_configs_raise_named_errors(overrides, message):
    with pytest.raises(ValueError) as error:
        tiny_config(*overrides)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.num_layer=2", "no key 'num_layer' in model"),
        ("model=3", "names a section"),
        ("model.num_layers=two", "model.num_layers: expected an integer"),
        ("distill.mode=grpo", "'grpo' is not one of"),
        ("nonsense", "must look like section.key=value"),
    ],
)
def test_bad_overrides_raise_named_errors(override, message):
    with pytest.raises(ValueError, match=".*") as error:
        load_config(None, [override])
    assert message in str(error.value)


def test_unknown_yaml_key_lists_known_keys(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['optim.learning_rate'\]"):
        load_config(str(path))


def test_padded_vocab_includes_added_mask_row():
    config = JobConfig()
    config.model.vocab_size = 49152
    config.model.vocab_pad_multiple = 128
    assert config.model.adds_mask_row
    assert config.model.student_mask_token_id == 49152
    assert config.model.padded_vocab_size == 49280
    config.model.mask_token_id = 151669
    config.model.vocab_size = 151936
    assert config.model.padded_vocab_size == 151936
