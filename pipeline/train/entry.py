"""What every stage does the same way: read its arguments, seed, build an Accelerator, find where to resume."""

from __future__ import annotations

import argparse
import errno
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config.loading import load_config
from pipeline.config.parsing import ConfigError
from pipeline.config.schema import PipelineConfig
from pipeline.run.files import OutputWriteError
from pipeline.run.stage_graph import EXTERNAL_MODEL, starting_model_source, upstream_final_dir


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
    return Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


def exit_with_error(message: str, code: int = 2) -> None:
    """One line on stderr, on a line of its own even while a progress bar is drawn; then exit."""
    from tqdm import tqdm

    tqdm.write(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_offline_mode(offline: bool) -> None:
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def quiet_transformers() -> None:
    """Keep the stage's own progress bar and banners readable: no per-save progress bars or load reports."""
    from transformers.utils import logging

    from pipeline.train.models import quiet_library_warnings

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
