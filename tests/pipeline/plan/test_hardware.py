"""The hardware a plan is for: from the flags, the Accelerate configs and this machine."""

import pytest

from pipeline.config.parsing import ConfigError
from pipeline.plan.hardware import GIB, Hardware, accelerate_launch_settings, available_ram_bytes, machine_hardware
from tests.helpers import REPO
from tests.pipeline.plan.memory_plan_examples import smoke


def test_hardware_from_flags_accelerate_configs_and_this_machine():
    accelerate = REPO / "configs" / "accelerate"
    assert accelerate_launch_settings(None) == (1, "ddp")
    assert accelerate_launch_settings(str(accelerate / "deepspeed_zero3.yaml")) == (8, "zero3")
    assert accelerate_launch_settings(str(accelerate / "deepspeed_zero2.yaml")) == (8, "zero2")
    assert accelerate_launch_settings(str(accelerate / "fsdp.yaml")) == (8, "fsdp2")
    assert accelerate_launch_settings(str(accelerate / "cpu_ddp.yaml")) == (2, "ddp")
    config = smoke(f"run.accelerate_config={accelerate / 'deepspeed_zero3.yaml'}")
    assert machine_hardware(config, gpu_memory_gib=80) == Hardware("cuda", 8, 80 * GIB, "zero3")
    assert machine_hardware(config, gpus=2, gpu_memory_gib=80, engine="fsdp2").engine == "fsdp2"
    import torch

    if not torch.cuda.is_available():
        here = machine_hardware(smoke())
        assert here.kind == "cpu" and here.devices == 1 and 0 < here.memory_bytes <= available_ram_bytes() * 1.5
        with pytest.raises(ConfigError, match="--gpus: this machine has no GPU"):
            machine_hardware(smoke(), gpus=2)
