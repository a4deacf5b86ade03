"""What the custom training loops (pretraining, PPO) do alike around their own steps: build the Accelerator, decide
whether to skip, resume or start (pipeline/run/start.py), reload the last checkpoint, write the manifest and the
metrics log, take checkpoints on a cadence, and finish. A stage reads:

    loop = CustomLoop(config, STAGE, settings, restart)
    if loop.already_finished:
        return loop.final_dir
    ... data, models, optimizer, accelerator.prepare ...
    step, state = loop.resume()                 # after prepare: accelerate reloads into the prepared objects
    loop.begin(max_steps=..., **manifest_fields)
    while step < max_steps:
        ... the stage's own step ...
        if loop.checkpoint_due(step):
            loop.save_checkpoint(step, {...})
    save_final_model(...)                      # pipeline/train/engines.py, on every process
    loop.finish(step, **manifest_fields)
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config.schema import PipelineConfig
from pipeline.run.checkpoints import read_trainer_state, save_training_checkpoint
from pipeline.run.manifests import MetricsLog, write_manifest
from pipeline.run.start import plan_stage_start
from pipeline.train.engine_launch import engine_accelerator, require_launched_engine
from pipeline.train.precision import bf16_enabled


class CustomLoop:
    """The skeleton of one stage's custom training loop. `settings` is the stage's config section; it supplies
    bf16, report_to, save_steps and max_steps."""

    def __init__(self, config: PipelineConfig, stage: str, settings: Any, restart: bool = False):
        self.config, self.stage, self.settings = config, stage, settings
        # gradient_accumulation_steps stays 1: the loops scale each micro-batch's loss themselves
        # (pipeline/train/engines.py sets DeepSpeed's own count).
        mixed_precision = "bf16" if bf16_enabled(settings.bf16) else "no"
        self.accelerator = engine_accelerator(mixed_precision, log_with=trackers(settings.report_to),
                                              project_dir=str(config.run_dir / stage))
        # Before anything is planned or written: the engine the launch asked for, or a one-line error.
        self.engine = require_launched_engine(self.accelerator, mixed_precision, stage)
        self.start = plan_stage_start(config, stage, restart, self.accelerator.is_main_process)
        self.stage_dir = self.start.stage_dir
        self.final_dir = self.stage_dir / "final"
        self.first_step, self.elapsed_before, self.started = 0, 0.0, time.time()
        self.metrics_log: MetricsLog | None = None
        if self.start.already_finished:
            self.print(f"already finished: {self.final_dir}")

    @property
    def already_finished(self) -> bool:
        return self.start.already_finished

    def print(self, message: str) -> None:
        self.accelerator.print(f"[{self.stage}] {message}")

    def resume(self) -> tuple[int, dict[str, Any]]:
        """(step, trainer state) of the checkpoint to resume from, its models, optimizer and RNG states loaded
        into the prepared objects; (0, {}) when starting afresh."""
        if self.start.resume_from is None:
            return 0, {}
        self.accelerator.load_state(str(self.start.resume_from))
        state = read_trainer_state(self.start.resume_from)
        self.first_step, self.elapsed_before = state["global_step"], state["elapsed_s"]
        self.print(f"resuming from {self.start.resume_from} (step {self.first_step})")
        return self.first_step, state

    def begin(self, **manifest_fields: Any) -> MetricsLog:
        """Record the stage as running (with its identity), open its metrics log cut back to the resumed step,
        start the trackers and the clock; returns the metrics log."""
        accelerator = self.accelerator
        if accelerator.is_main_process:
            self.stage_dir.mkdir(parents=True, exist_ok=True)
            write_manifest(self.stage_dir, stage=self.stage, status="running", **self.start.identity,
                           engine=self.engine.as_manifest(), **manifest_fields)
        self.metrics_log = self.open_log("metrics.jsonl")
        accelerator.init_trackers(self.stage)
        self.started = time.time()
        return self.metrics_log

    def open_log(self, name: str) -> MetricsLog:
        """A jsonl log in the stage directory, cut back to the resumed step (written by the main process)."""
        resumed_at = self.first_step if self.start.resume_from is not None else None
        return MetricsLog(self.stage_dir / name, resumed_at, enabled=self.accelerator.is_main_process)

    def elapsed(self) -> float:
        """Seconds of training so far, the runs before a resume included."""
        return self.elapsed_before + time.time() - self.started

    def checkpoint_due(self, step: int) -> bool:
        return step % self.settings.save_steps == 0 or step == self.settings.max_steps

    def save_checkpoint(self, step: int, state: dict[str, Any] | None = None,
                        write_extra: Callable[[Path], None] | None = None) -> None:
        """Every process calls it: Accelerate's state plus `state` and the elapsed time, as checkpoint-<step>."""
        save_training_checkpoint(self.accelerator, self.stage_dir, step, {"elapsed_s": self.elapsed(), **(state or {})},
                                 self.config.run.keep_last_checkpoints, write_extra)

    def finish(self, step: int, **manifest_fields: Any) -> Path:
        """Every process calls it, after the final model is written: the manifest says finished; returns final/."""
        if self.accelerator.is_main_process:
            write_manifest(self.stage_dir, status="finished", steps=step, wall_time_s=round(self.elapsed(), 1),
                           **manifest_fields)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        self.print(f"done: {self.final_dir}")
        return self.final_dir


def trackers(report_to: str) -> list[str] | None:
    """Accelerate trackers to log to: `auto` means tensorboard when it is installed, else none."""
    if report_to == "none":
        return None
    if report_to == "auto":
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") else None
    return [report_to]
