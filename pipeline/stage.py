"""What every stage does the same way: read its arguments, seed, build an Accelerator, find where to resume."""

from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import random
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.checkpoints import (
    OutputWriteError, latest_checkpoint, policy_snapshots, read_manifest, remove_stale_temporaries)
from pipeline.config import ConfigError, PipelineConfig, load_config
from pipeline.stage_graph import (
    EXTERNAL_MODEL, changed_inputs, config_values, set_aside, stage_identity, starting_model_source,
    upstream_final_dir)

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


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "",
                       defaults: dict[str, Any] | None = None) -> list[str]:
    """Dotted keys whose values differ between two nested dicts. With `defaults` (the same keys' default values),
    a key that `old` lacks and `new` holds at its default is no difference: it is a setting added to the pipeline
    after `old` was recorded, and the default keeps what the code did before it existed."""
    keys = sorted(set(old) | set(new))
    differences = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        default = (defaults or {}).get(key)
        if defaults is not None and key not in old and key in defaults and b == default:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            differences += config_differences(a, b, f"{prefix}{key}.",
                                              default if isinstance(default, dict) else None)
        elif a != b:
            differences.append(f"{prefix}{key}")
    return differences


@dataclass
class StageStart:
    """Where a stage begins: from scratch, from a checkpoint, or nothing to do because final/ is current.
    `identity` (config values and input digests) goes into the manifest; `set_aside` says where outputs that
    were stale or restarted went, and why."""

    stage_dir: Path
    resume_from: Path | None
    already_finished: bool
    identity: dict[str, Any] = field(default_factory=dict)
    set_aside: tuple[Path, str] | None = None


def plan_stage_start(config: PipelineConfig, stage: str, restart: bool, is_main_process: bool = True) -> StageStart:
    """Decide whether to skip, resume or start a stage, from its identity (config values and the digests of
    the models it reads, pipeline/stage_graph.py) against the one its manifest recorded:
    - same identity, finished: skip; same identity, interrupted: resume from the newest complete checkpoint;
    - its own config changed: refuse (a typo must not discard work), `--restart` starts it over;
    - an input model changed: a finished stage is stale, so its outputs are set aside and it starts over; an
      interrupted one is refused like a config change.
    Only the main process moves files; the others reach the same decision from the same manifest."""
    stage_dir = config.run_dir / stage
    identity = stage_identity(config, stage, write_cache=is_main_process)
    if restart:
        moved = set_aside(config.run_dir, stage, "restarted with --restart") if is_main_process else None
        announce_set_aside(stage, moved, "restarted")
        return StageStart(stage_dir, None, False, identity, (moved, "restarted") if moved else None)
    manifest = read_manifest(stage_dir)
    finished = manifest is not None and manifest.get("status") == "finished" and (stage_dir / "final").is_dir()
    # A policy snapshot counts: a resumed run keeps the snapshots it finds, so they must share its identity.
    has_outputs = (latest_checkpoint(stage_dir) is not None or (stage_dir / "final").is_dir()
                   or bool(policy_snapshots(stage_dir)))
    if manifest is not None and has_outputs:
        changed = config_differences(manifest.get("config") or {}, identity["config"],
                                     defaults=config_values(PipelineConfig(), stage))
        if changed:
            raise ConfigError(
                f"{stage}: config changed since this stage's checkpoints were written ({', '.join(changed[:5])}); "
                f"run with --restart {stage} to start it over, or restore the old values")
        inputs_changed = changed_inputs(manifest.get("inputs"), identity["inputs"])
        if inputs_changed and not finished:
            raise ConfigError(
                f"{stage}: {inputs_changed[0]} since this stage's checkpoints were written; run with --restart "
                f"{stage} to start it over from the new input")
        if inputs_changed:
            reason = f"stale: {'; '.join(inputs_changed)}"
            moved = set_aside(config.run_dir, stage, reason) if is_main_process else None
            announce_set_aside(stage, moved, reason)
            return StageStart(stage_dir, None, False, identity, (moved, reason) if moved else None)
    if finished:
        return StageStart(stage_dir, None, True, identity)
    if is_main_process:
        remove_stale_temporaries(stage_dir)
    return StageStart(stage_dir, latest_checkpoint(stage_dir), False, identity)


def announce_set_aside(stage: str, moved: Path | None, reason: str) -> None:
    if moved is not None:
        print(f"[{stage}] {reason}; its earlier outputs are kept in {moved}; starting it over", flush=True)


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
    if requested and not torch.cuda.is_available() and not cpu_has_bf16_matmuls():
        warnings.warn("bf16 was asked for, but this CPU has no bf16 matrix instructions (AVX512-BF16 or AMX): its bf16 "
                      "matmuls run some 50x slower than fp32 (2.8 vs 156 GFLOP/s on a 2-core AVX2 EPYC); set bf16: false")
    if requested is not None:
        return requested
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def cpu_has_bf16_matmuls() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU (AVX512-BF16 or AMX), not emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def set_offline_mode(offline: bool) -> None:
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def quiet_transformers() -> None:
    """Keep the stage's own progress bar and banners readable: no per-save progress bars or load reports."""
    from transformers.utils import logging

    from pipeline.models import quiet_library_warnings

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    quiet_library_warnings()


def run_stage_main(stage: str, runner: Callable[[PipelineConfig, bool], Any], argv: list[str] | None = None) -> None:
    """Entry point shared by `python -m stages.<stage>`: config errors exit 2 before any work starts."""
    config, restart = parse_stage_arguments(stage, argv)
    set_offline_mode(config.run.offline)
    quiet_transformers()
    from data.loading import DataError

    try:
        runner(config, restart)
        leave_process_group()
    except (ConfigError, DataError) as error:
        exit_with_error(str(error))
    except (FloatingPointError, OutputWriteError) as error:  # diverged, or disk full: still one clear line
        exit_with_error(str(error), code=1)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
            raise
        exit_with_error(f"{stage}: could not write to {config.run_dir}: {error.strerror}; complete checkpoints "
                        f"are intact, the newest one is resumed from after the cause is fixed", code=1)


def leave_process_group() -> None:
    """After a stage's work, in a process of a multi-process launch: wait for the others, then exit at once. Left
    to the interpreter's teardown, DeepSpeed's and gloo's communication threads were at times destroyed while still
    joinable: a process aborted ("terminate called without an active exception", SIGABRT) after the stage had
    finished and saved, and the launcher reported the stage failed. Everything is written by then; a lone process
    (and a stage run inside a test) returns normally."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def stage_input_model(config: PipelineConfig, stage: str) -> str:
    """The model a stage starts from: the upstream stage's final/ when that stage is part of the run or
    finished, else `model.name_or_path` (a hub id or path), else a ConfigError saying what to do."""
    source = starting_model_source(config, stage)
    if source == EXTERNAL_MODEL:
        return config.model.name_or_path
    return str(upstream_final_dir(config, stage, source))
