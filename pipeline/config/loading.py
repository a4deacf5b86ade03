"""Loading a run config: YAML file, `key=value` overrides, typing and validation, in that order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config.parsing import apply_override, dataclass_from_dict, read_yaml_mapping
from pipeline.config.schema import STAGES, PipelineConfig, trainer_section
from pipeline.config.validation import validate


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a YAML run config, apply `key=value` overrides, and validate everything."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        raw = read_yaml_mapping(path)
    config = config_from_mapping(raw, overrides)
    config.source = str(path) if path is not None else None
    validate(config, STAGES)
    return config


def config_from_mapping(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Typed sections from a mapping (a YAML file's, or another config's to_dict()) with `key=value` overrides
    applied; the values are not validated yet."""
    for override in overrides:
        apply_override(raw, override)
    config = dataclass_from_dict(PipelineConfig, raw, "")
    for stage in ("sft", "reward"):
        setattr(config, stage, trainer_section(stage, getattr(config, stage)))
    return config
