import pytest

from pipeline.config.parsing import ConfigError, apply_override


def test_override_must_be_key_value():
    with pytest.raises(ConfigError, match="not of the form key=value"):
        apply_override({}, "pretrain.max_steps")
    with pytest.raises(ConfigError, match="pretrain is not a section"):
        apply_override({"pretrain": 3}, "pretrain.max_steps=2")
