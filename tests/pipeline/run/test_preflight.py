"""pipeline/preflight.py's Accelerate-config check: an engine that cannot run here is refused before anything is
written (the bad-input corpus covers FSDP1, ZeRO-3 without gathering and a config that is not a mapping)."""

from __future__ import annotations

import importlib.util

import pytest

from pipeline.config.loading import load_config
from pipeline.config.parsing import ConfigError
from pipeline.run.preflight import check_accelerate_config
from tests.helpers import REPO


def test_deepspeed_asked_for_but_not_installed_is_refused_with_the_install_command(monkeypatch):
    config = load_config(REPO / "configs" / "smoke.yaml",
                         [f"run.accelerate_config={REPO / 'configs' / 'accelerate' / 'cpu_zero3.yaml'}"])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "deepspeed" else real_find_spec(name, *args))
    with pytest.raises(ConfigError, match=r'asks for DeepSpeed, which is not installed; install it with pip install '
                                          r'-e "\.\[deepspeed\]"'):
        check_accelerate_config(config)


@pytest.mark.parametrize("name", ["cpu_ddp.yaml", "cpu_zero2.yaml", "cpu_zero3.yaml", "cpu_fsdp2.yaml",
                                  "deepspeed_zero3.yaml", "fsdp.yaml", "multi_node.yaml"])
def test_the_shipped_accelerate_configs_pass(name):
    if "zero" in name and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed")
    check_accelerate_config(load_config(REPO / "configs" / "smoke.yaml",
                                        [f"run.accelerate_config={REPO / 'configs' / 'accelerate' / name}"]))
