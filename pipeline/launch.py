"""`rlhf run`: each stage as its own `accelerate launch` process, skipping finished stages, resuming the rest."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.checkpoints import checkpoint_step, latest_checkpoint, read_manifest
from pipeline.config import ConfigError, PipelineConfig
from pipeline.stage import plan_stage_start
from pipeline.stage_graph import STAGE_GRAPH, stale_reason


class StageFailed(RuntimeError):
    def __init__(self, stage: str, code: int):
        super().__init__(f"stage {stage} failed with exit code {code}; fix the cause and re-run: finished stages "
                         f"are skipped and {stage} resumes from its newest checkpoint")
        self.stage, self.code = stage, code


@contextmanager
def run_directory_lock(run_dir: Path) -> Iterator[None]:
    """One `rlhf run` per run directory: a second one fails at once instead of corrupting checkpoints."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"run directory {run_dir} is in use by {holder}; wait for it or pick another run.name")
    handle.seek(0)
    handle.truncate()
    handle.write(f"rlhf run (pid {os.getpid()})")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def launch_command(config: PipelineConfig, stage: str, overrides: list[str], restart: bool) -> list[str]:
    """`accelerate launch` with the run's Accelerate config, or one local process (CPU or one GPU) without one."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if config.run.accelerate_config:
        launcher += ["--config_file", config.run.accelerate_config]
    else:
        launcher += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command = launcher + ["-m", f"stages.{stage}"]
    if config.source:
        command += ["--config", config.source]
    if restart:
        command.append("--restart")
    return command + list(overrides)


def stage_environment(config: PipelineConfig) -> dict[str, str]:
    """`accelerate launch` pins a lone CPU process to one thread unless told otherwise: give it every core."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not config.run.accelerate_config:
        environment.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    if not torch.cuda.is_available():
        # Without it a multi-process launch on a machine with no GPU runs processes that each think they are
        # alone; with it they form one DDP group over gloo (configs/accelerate/cpu_ddp.yaml).
        environment.setdefault("ACCELERATE_USE_CPU", "1")
    return environment


@dataclass
class StageOutcome:
    stage: str
    status: str  # "ran", "skipped"
    steps: int | None
    wall_time_s: float | None
    key_metric: str
    value: float | None


def run_stages(config: PipelineConfig, overrides: list[str], restart: set[str]) -> list[StageOutcome]:
    """Run the configured stages in order; raise StageFailed naming the first one that fails.

    Each stage is planned here, just before it would start and after its upstream stages have run: a finished
    stage whose input models changed since it was trained (an upstream stage re-ran, model.name_or_path points
    elsewhere) is stale, so its outputs are set aside and it runs again, and so, in turn, does every stage after
    it whose inputs that changes."""
    outcomes = []
    for stage in config.run.stages:
        start = plan_stage_start(config, stage, restart=stage in restart, is_main_process=True)
        if start.already_finished:
            banner(f"{stage}: finished earlier, skipped")
            outcomes.append(outcome(config, stage, "skipped"))
            continue
        if start.set_aside is not None:
            note = f"starting over, earlier outputs kept in {start.set_aside[0]}"
        else:
            note = "resuming from " + start.resume_from.name if start.resume_from else "starting"
        banner(f"{stage}: {note}")
        began = time.time()
        # The stage plans its own start again and, finding what this process left, makes the same decision.
        code = subprocess.call(launch_command(config, stage, overrides, restart=False), env=stage_environment(config))
        if code != 0:
            raise StageFailed(stage, code)
        banner(f"{stage}: done in {time.time() - began:.0f}s")
        outcomes.append(outcome(config, stage, "ran"))
    return outcomes


def outcome(config: PipelineConfig, stage: str, status: str) -> StageOutcome:
    manifest = read_manifest(config.run_dir / stage) or {}
    key = STAGE_GRAPH[stage].key_metric
    return StageOutcome(stage, status, manifest.get("steps"), manifest.get("wall_time_s"), key,
                        (manifest.get("metrics") or {}).get(key))


def banner(text: str) -> None:
    print(f"\n==== {text} ====", flush=True)


def summary_table(outcomes: list[StageOutcome]) -> str:
    rows = [("stage", "status", "steps", "wall time", "key metric")]
    for o in outcomes:
        value = "" if o.value is None else f"{o.key_metric} = {o.value:.4g}"
        rows.append((o.stage, o.status, "" if o.steps is None else str(o.steps),
                     "" if o.wall_time_s is None else f"{o.wall_time_s:.0f}s", value))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def stage_status(run_dir: Path, stage: str) -> str:
    """One line: done (steps, wall time), stale (why), in progress (step N of M), or pending."""
    stage_dir = run_dir / stage
    manifest = read_manifest(stage_dir)
    if manifest and manifest.get("status") == "finished" and (stage_dir / "final").is_dir():
        reason = stale_reason(run_dir, stage)
        if reason is not None:
            return f"stale       {reason}; `rlhf run` trains it again"
        return f"done        {manifest.get('steps')} steps in {manifest.get('wall_time_s', 0):.0f}s"
    latest = latest_checkpoint(stage_dir)
    if manifest or latest:
        total = (manifest or {}).get("max_steps", "?")
        step = checkpoint_step(latest) if latest else 0
        return f"in progress step {step} of {total} (newest complete checkpoint)"
    return "pending"
