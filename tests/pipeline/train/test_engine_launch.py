"""pipeline/train/engine_launch.py in one process: what `accelerate launch` asked for, read from its environment, and
the refusal when the Accelerator runs something else. The engine tier (tests/engines/) builds every engine for
real on 2 processes."""

from __future__ import annotations

import pytest
from accelerate import Accelerator

from pipeline.config.parsing import ConfigError
from pipeline.train.engine_launch import (
    EngineRecord, engine_accelerator, launched_engine, require_launched_engine, trainer_engine_arguments)


@pytest.mark.parametrize("environ, expected", [
    ({}, ("single", 1)),
    ({"WORLD_SIZE": "2"}, ("ddp", 2)),
    ({"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, ("zero3", 2)),
    ({"WORLD_SIZE": "4", "ACCELERATE_USE_DEEPSPEED": "true"}, ("zero2", 4)),
    ({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, ("fsdp2", 2)),
    ({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}, ("fsdp1", 2)),
])
def test_the_launched_engine_is_read_from_the_launchers_environment(environ, expected):
    assert launched_engine(environ) == expected


def test_the_accelerator_of_a_lone_process_is_recorded_and_agrees(monkeypatch):
    for name in ("WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)
    accelerator = engine_accelerator("no", cpu=True)
    record = require_launched_engine(accelerator, "no", "pretrain")
    assert record == EngineRecord("single", 1, "no")
    assert record.as_manifest() == {"engine": "single", "processes": 1, "mixed_precision": "no"}
    assert trainer_engine_arguments(accelerator) == {"accelerator_config": {"use_configured_state": True},
                                                     "bf16": False}


def test_an_accelerator_that_is_not_the_launched_engine_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    accelerator = Accelerator(cpu=True)  # what stock Accelerate gives with ACCELERATE_USE_CPU=1: no DeepSpeed
    with pytest.raises(ConfigError, match=r"^sft: run.accelerate_config asked for zero3 on 1 process\(es\), mixed "
                                          r"precision no, but Accelerate runs single on 1 process\(es\)"):
        require_launched_engine(accelerator, "no", "sft")


def test_a_mixed_precision_other_than_the_stage_asked_for_is_refused():
    accelerator = Accelerator(cpu=True)
    with pytest.raises(ConfigError, match="mixed precision bf16, but Accelerate runs single on 1 process"):
        require_launched_engine(accelerator, "bf16", "ppo")
