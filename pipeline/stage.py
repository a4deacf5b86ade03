"""What every stage does the same way: read its arguments, seed, build an Accelerator, find where to resume."""

from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.checkpoints import OutputWriteError, latest_checkpoint, read_manifest, remove_stale_temporaries
from pipeline.config import ConfigError, PipelineConfig, load_config

# The config sections whose change makes a stage's checkpoints and final model stale.
STAGE_INPUTS = {
    "pretrain": ("model", "tokenizer", "data.builtin", "data.pretrain", "pretrain"),
    "sft": ("data.builtin", "data.sft", "sft"),
    "reward": ("data.builtin", "data.reward", "reward"),
    "ppo": ("data.builtin", "data.ppo", "ppo"),
}


def parse_stage_arguments(stage: str, argv: list[str] | None = None) -> tuple[PipelineConfig, bool]:
    """Parse `--config FILE [--restart] [key=value ...]`; a bad config exits 2 with one line naming the key."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=f"Run the {stage} stage.")
    parser.add_argument("--config", help="YAML run config (configs/default.yaml if omitted)")
    parser.add_argument("--restart", action="store_true", help="discard this stage's checkpoints and start over")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. pretrain.max_steps=50")
    arguments = parser.parse_args(argv)
    try:
        config = load_config(arguments.config or default_config_path(), arguments.overrides)
    except ConfigError as error:
        exit_with_error(str(error))
    return config, arguments.restart


def default_config_path() -> Path:
    return Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def exit_with_error(message: str, code: int = 2) -> None:
    """One line on stderr, on a line of its own even while a progress bar is drawn; then exit."""
    from tqdm import tqdm

    tqdm.write(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stage_fingerprint(config: PipelineConfig, stage: str) -> dict[str, Any]:
    """The parts of the config a stage's result depends on, for deciding whether a checkpoint is stale."""
    as_dict = config.to_dict()
    fingerprint: dict[str, Any] = {"run.seed": config.run.seed}
    for dotted in STAGE_INPUTS[stage]:
        node: Any = as_dict
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        fingerprint[dotted] = node
    return json.loads(json.dumps(fingerprint, default=str))


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys = sorted(set(old) | set(new))
    differences = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differences += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            differences.append(f"{prefix}{key}")
    return differences


@dataclass
class StageStart:
    """Where a stage begins: from scratch, from a checkpoint, or nothing to do because final/ is current."""

    stage_dir: Path
    resume_from: Path | None
    already_finished: bool


def plan_stage_start(config: PipelineConfig, stage: str, restart: bool, is_main_process: bool = True) -> StageStart:
    """Decide whether to resume, skip, or refuse because the config changed since the checkpoints were made."""
    stage_dir = config.run_dir / stage
    manifest = read_manifest(stage_dir)
    fingerprint = stage_fingerprint(config, stage)
    if restart:
        if is_main_process:
            discard_stage_outputs(stage_dir)
        return StageStart(stage_dir, None, False)
    if manifest is not None and manifest.get("config") is not None:
        changed = config_differences(manifest["config"], fingerprint)
        if changed and (latest_checkpoint(stage_dir) is not None or (stage_dir / "final").is_dir()):
            raise ConfigError(
                f"{stage}: config changed since this stage's checkpoints were written ({', '.join(changed[:5])}); "
                f"run with --restart {stage} to start it over, or restore the old values")
    if manifest is not None and manifest.get("status") == "finished" and (stage_dir / "final").is_dir():
        return StageStart(stage_dir, None, True)
    if is_main_process:
        remove_stale_temporaries(stage_dir)
    return StageStart(stage_dir, latest_checkpoint(stage_dir), False)


def discard_stage_outputs(stage_dir: Path) -> None:
    import shutil

    if stage_dir.is_dir():
        shutil.rmtree(stage_dir)


def trackers(report_to: str) -> list[str] | None:
    """Accelerate trackers to log to: `auto` means tensorboard when it is installed, else none."""
    if report_to == "none":
        return None
    if report_to == "auto":
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") else None
    return [report_to]


def bf16_enabled(requested: bool | None) -> bool:
    """bf16 autocast by default on GPUs that support it (Ampere on). Not on CPU: for 128-wide models it pays in
    pretraining (bench/pretrain_throughput.py on 2 AMX cores: 27k tokens/s vs 23k fp32) but not in PPO, whose
    generation and scoring are dominated by small ops that autocast only makes dearer (bench/ppo_step.py:
    2.7 s/step vs 2.6 fp32); ask for it with `bf16: true` where it pays, e.g. wider models on CPUs with AMX."""
    if requested is not None:
        return requested
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def set_offline_mode(offline: bool) -> None:
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def quiet_transformers() -> None:
    """Keep the stage's own progress bar and banners readable: no per-save progress bars or load reports."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def run_stage_main(stage: str, runner: Callable[[PipelineConfig, bool], Any], argv: list[str] | None = None) -> None:
    """Entry point shared by `python -m stages.<stage>`: config errors exit 2 before any work starts."""
    config, restart = parse_stage_arguments(stage, argv)
    set_offline_mode(config.run.offline)
    quiet_transformers()
    from data.loading import DataError

    try:
        runner(config, restart)
    except (ConfigError, DataError) as error:
        exit_with_error(str(error))
    except (FloatingPointError, OutputWriteError) as error:  # diverged, or disk full: still one clear line
        exit_with_error(str(error), code=1)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
            raise
        exit_with_error(f"{stage}: could not write to {config.run_dir}: {error.strerror}; complete checkpoints "
                        f"are intact, the newest one is resumed from after the cause is fixed", code=1)


PREVIOUS_STAGE = {"sft": "pretrain", "reward": "sft", "ppo": "sft"}


def stage_input_model(config: PipelineConfig, stage: str) -> str:
    """The model a stage starts from: the previous stage's final/ when that stage is part of the run or
    finished, else `model.name_or_path` (a hub id or path), else a ConfigError saying what to do."""
    previous = PREVIOUS_STAGE[stage]
    final_dir = config.run_dir / previous / "final"
    if previous in config.run.stages or final_dir.is_dir():
        if not final_dir.is_dir():
            raise ConfigError(f"{stage}: needs the {previous} stage's model at {final_dir}; run {previous} first")
        return str(final_dir)
    if config.model.name_or_path is None:
        raise ConfigError(f"{stage}: no input model: add '{previous}' to run.stages or set model.name_or_path")
    return config.model.name_or_path
