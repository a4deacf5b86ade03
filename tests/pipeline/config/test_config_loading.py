from dataclasses import asdict
from pathlib import Path

import pytest

from pipeline.config.loading import load_config
from pipeline.config.parsing import ConfigError

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["smoke.yaml", "default.yaml", "quality.yaml"])
def test_presets_load(name):
    config = load_config(CONFIGS / name)
    assert config.pretrain.max_steps > 0
    assert config.source.endswith(name)


def test_the_quality_preset_is_the_default_with_more_sft():
    # A whole file like every preset; this keeps it from drifting from the default it was measured against.
    quality = asdict(load_config(CONFIGS / "quality.yaml"))
    default = asdict(load_config(CONFIGS / "default.yaml", [
        "run.name=quality", "data.builtin.sft_dialogues=20000", "sft.max_steps=3000", "sft.eval_steps=1000",
        "sft.save_steps=1000"]))
    assert {key for key in quality if quality[key] != default[key]} == {"source"}


def test_overrides_parse_yaml_values():
    config = load_config(CONFIGS / "smoke.yaml", ["pretrain.max_steps=3", "pretrain.learning_rate=1e-4",
                                                 "run.stages=[pretrain, sft]", "pretrain.bf16=false"])
    assert config.pretrain.max_steps == 3
    assert config.pretrain.learning_rate == pytest.approx(1e-4)
    assert config.run.stages == ["pretrain", "sft"]
    assert config.pretrain.bf16 is False


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError, match=r"pretrain\.max_stepz: unknown key \(did you mean 'max_steps'\?\)"):
        load_config(write(tmp_path, "pretrain:\n  max_stepz: 3\n"))


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"^pretrian: unknown key \(did you mean 'pretrain'\?\)"):
        load_config(write(tmp_path, "pretrian: {}\n"))


@pytest.mark.parametrize("text, message", [
    ("pretrain:\n  max_steps: ten\n", r"pretrain\.max_steps: expected int, got str 'ten'"),
    ("pretrain:\n  max_steps: true\n", r"pretrain\.max_steps: expected int"),
    ("pretrain:\n  max_steps: 0\n", r"pretrain\.max_steps: must be positive"),
    ("pretrain:\n  lr_scheduler_type: cosin\n", r"pretrain\.lr_scheduler_type: must be one of"),
    ("model:\n  hidden_size: 100\n  num_attention_heads: 3\n", r"model\.hidden_size: 100 is not divisible"),
    ("pretrain:\n  seq_length: 512\n", r"pretrain\.seq_length: 512 exceeds model\.max_position_embeddings"),
    ("run:\n  stages: [pretrain, sfft]\n", r"run\.stages\[1\]: unknown stage \(did you mean 'sft'\?\)"),
    ("data:\n  sft:\n    path: missing.jsonl\n", r"data\.sft\.path: file missing\.jsonl does not exist"),
    ("model:\n  name_or_path: ./nowhere\n", r"model\.name_or_path: directory \./nowhere does not exist"),
    ("pretrain: 3\n", r"pretrain: expected a mapping"),
    ("- a\n- b\n", r"the top level must be a mapping"),
    ("pretrain:\n  max_steps: [1\n", r"not valid YAML at line 3"),
    ("ppo:\n  policy_snapshot_steps: 0\n", r"^ppo\.policy_snapshot_steps: must be at least 1 \(or null for none\), got 0$"),
])
def test_bad_configs_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_policy_snapshots_are_off_by_default_and_every_20_steps_in_the_default_preset():
    assert load_config(CONFIGS / "smoke.yaml").ppo.policy_snapshot_steps is None
    default = load_config(CONFIGS / "default.yaml").ppo
    assert default.policy_snapshot_steps == 20 and default.max_steps % 20 == 0


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
