"""What the two stages built on HF's Trainer (SFT and reward) do alike around `trainer.train()`, as CustomLoop does
for the custom loops: build the Accelerator of the launched engine, decide whether to skip, resume or start, derive
the Trainer's arguments from the config, mark checkpoints complete and write metrics.jsonl (a callback), show one
progress bar with the key figures, write the manifest, and finish. A stage reads:

    stage = TrainerStage(config, STAGE, restart)
    if stage.already_finished:
        return stage.final_dir
    ... data, model ...
    trainer = XTrainer(model, args=stage.arguments(has_eval=...), callbacks=stage.callbacks(), ...)
    stage.train(trainer, input_model)
    save_final_model(...)                      # pipeline/train/final_save.py, on every process
    return stage.finish(trainer, **manifest_fields)
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from pipeline.config.parsing import ConfigError
from pipeline.config.schema import TRAINER_EXTRAS, PipelineConfig, trainer_arguments_class
from pipeline.run.checkpoints import checkpoint_step, mark_checkpoint_complete, prune_checkpoints
from pipeline.run.manifests import MetricsLog, write_manifest
from pipeline.run.start import StageStart, plan_stage_start
from pipeline.train.engine_launch import (
    EngineRecord, engine_accelerator, require_launched_engine, trainer_engine_arguments)
from pipeline.train.engines import engine_of
from pipeline.train.guards import fault_point, finite_on_every_process
from pipeline.train.precision import bf16_enabled

# Timing figures differ between two runs of the same config; metrics.jsonl keeps only what training computed.
TIMING_KEYS = ("runtime", "per_second", "total_flos")


def is_local_main_process() -> bool:
    """Whether this process is the first on its machine: the one that draws progress bars."""
    from accelerate import PartialState

    return PartialState().is_local_main_process


def trainer_stage_accelerator(config: PipelineConfig, stage: str) -> tuple[Accelerator, EngineRecord]:
    """The Accelerator of the launched engine, built before the Trainer so that the Trainer runs on its state
    (`trainer_arguments`), and what it runs on; a ConfigError when that is not what the launch asked for."""
    mixed_precision = "bf16" if bf16_enabled(getattr(config, stage).get("bf16")) else "no"
    accelerator = engine_accelerator(mixed_precision)
    return accelerator, require_launched_engine(accelerator, mixed_precision, stage)


def trainer_arguments(config: PipelineConfig, stage: str, stage_dir: Path, has_eval: bool, accelerator: Accelerator,
                      **fixed: Any):
    """SFTConfig / RewardConfig from the stage's section: the user's fields plus what the run directory and the
    stage's Accelerator (its engine, trainer_stage_accelerator) decide."""
    section = {k: v for k, v in getattr(config, stage).items() if k not in TRAINER_EXTRAS[stage]}
    section.setdefault("logging_steps", 10)
    arguments = {
        **section,
        "output_dir": str(stage_dir), "seed": config.run.seed, "data_seed": config.run.seed,
        "save_strategy": "steps", "save_total_limit": None,  # pruning is ours: only after the marker is written
        "eval_strategy": section.get("eval_strategy", "steps") if has_eval else "no",
        "bf16": bf16_enabled(section.get("bf16")),
        "dataloader_num_workers": 0, "dataloader_pin_memory": torch.cuda.is_available(),
        "disable_tqdm": not is_local_main_process(), **trainer_engine_arguments(accelerator), **fixed,
    }
    arguments = trainer_arguments_class(stage)(**arguments)
    if engine_of(accelerator).deepspeed:
        # TrainingArguments builds a DeepSpeed plugin of its own from the launcher's environment, which a Trainer
        # on the configured state must not pass on; the state's plugin is registered again as transformers'
        # global DeepSpeed config (what makes from_pretrained build ZeRO-3 models partitioned).
        arguments.deepspeed_plugin = None
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()
    return arguments


class PipelineCallback(TrainerCallback):
    """Completion markers after each save, pruning, metrics.jsonl, and a clear stop on a NaN loss."""

    def __init__(self, stage_dir: Path, keep_last: int, metrics_log: MetricsLog):
        self.stage_dir, self.keep_last, self.metrics_log = Path(stage_dir), keep_last, metrics_log

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        fault_point("update", self.stage_dir.name, state.global_step, model)

    def on_save(self, args, state, control, model=None, **kwargs):
        # Every process checks its shard and all agree, so all stop together. The checkpoint stays unmarked.
        if model is not None and not finite_on_every_process(model):
            raise FloatingPointError(f"{self.stage_dir.name}: weights became NaN/inf before step {state.global_step}; "
                                     f"the last good checkpoint is kept (lower the learning rate and resume)")
        if state.is_world_process_zero:
            mark_checkpoint_complete(self.stage_dir / f"checkpoint-{state.global_step}", state.global_step)
            prune_checkpoints(self.stage_dir, self.keep_last)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = {k: v for k, v in (logs or {}).items()
                if isinstance(v, (int, float)) and not any(t in k for t in TIMING_KEYS)}
        loss = logs.get("loss", logs.get("eval_loss"))
        if loss is not None and not math.isfinite(loss):
            raise FloatingPointError(f"{self.stage_dir.name}: loss became {loss} at step {state.global_step}; the "
                                     f"last good checkpoint is kept (lower the learning rate and resume)")
        if state.is_world_process_zero and logs:
            self.metrics_log.write(state.global_step, logs)


def train_with_resume(trainer: Trainer, start: StageStart, config: PipelineConfig, stage: str,
                      input_checkpoint: str, engine: EngineRecord) -> float:
    """Train from the newest complete checkpoint if there is one; return the wall time of this run."""
    resume = str(start.resume_from) if start.resume_from is not None else None
    trainer_engine = engine_of(trainer.accelerator).name, trainer.accelerator.num_processes
    if trainer_engine != (engine.engine, engine.processes):
        raise ConfigError(f"{stage}: the Trainer runs {trainer_engine[0]} on {trainer_engine[1]} process(es), not the "
                          f"launched {engine.describe()}; nothing was trained")
    if trainer.is_world_process_zero():
        start.stage_dir.mkdir(parents=True, exist_ok=True)
        write_manifest(start.stage_dir, stage=stage, status="running", input_checkpoint=input_checkpoint,
                       max_steps=trainer.args.max_steps, engine=engine.as_manifest(), **start.identity)
    if resume:
        print(f"[{stage}] resuming from {resume} (step {checkpoint_step(start.resume_from)})", flush=True)
    began = time.time()
    trainer.train(resume_from_checkpoint=resume)
    return time.time() - began


def metrics_log_for(start: StageStart, is_main: bool, name: str = "metrics.jsonl") -> MetricsLog:
    """A jsonl log in the stage directory, cut back to the checkpoint the stage resumes from."""
    resume_step = checkpoint_step(start.resume_from) if start.resume_from is not None else None
    return MetricsLog(start.stage_dir / name, resume_step, enabled=is_main)


class KeyFiguresBar(TrainerCallback):
    """One progress bar over the optimizer steps with the latest key figures beside it (as PPO's), in place of the
    Trainer's bar and the raw `{'loss': ...}` dicts it prints between bars; every logged value still goes to
    metrics.jsonl (PipelineCallback)."""

    FIGURES = {"loss": "loss", "eval_loss": "eval_loss", "eval_accuracy": "eval_acc", "accuracy": "acc",
               "grad_norm": "grad", "learning_rate": "lr"}

    def __init__(self, stage: str):
        self.stage, self.bar, self.figures = stage, None, {}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_local_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.stage, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None:
            return
        for key, label in self.FIGURES.items():
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)):
                self.figures[label] = f"{value:.2e}" if key == "learning_rate" else f"{value:.3g}"
        self.bar.set_postfix(self.figures, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TrainerStage:
    """The skeleton of a stage trained by an HF Trainer (see the module docstring)."""

    def __init__(self, config: PipelineConfig, stage: str, restart: bool = False):
        self.config, self.stage = config, stage
        # Before anything is planned or written: the engine the launch asked for, or a one-line error.
        self.accelerator, self.engine = trainer_stage_accelerator(config, stage)
        self.is_main_process = self.accelerator.is_main_process
        self.start = plan_stage_start(config, stage, restart, self.is_main_process)
        self.stage_dir = self.start.stage_dir
        self.final_dir = self.stage_dir / "final"
        self.wall_time = 0.0
        if self.already_finished:
            self.print(f"already finished: {self.final_dir}")
            return
        # Opened only for a stage that trains: opening cuts the log back to the resumed step (or empties it).
        self.metrics_log = metrics_log_for(self.start, self.is_main_process)

    @property
    def already_finished(self) -> bool:
        return self.start.already_finished

    def print(self, message: str) -> None:
        if self.is_main_process:
            tqdm.write(f"[{self.stage}] {message}")

    def arguments(self, has_eval: bool, **fixed: Any):
        """The Trainer's arguments (trainer_arguments) for this stage's directory and Accelerator."""
        return trainer_arguments(self.config, self.stage, self.stage_dir, has_eval, self.accelerator, **fixed)

    def callbacks(self, *more: TrainerCallback) -> list[TrainerCallback]:
        """Completion markers, metrics.jsonl and the NaN stop, then the stage's own callbacks."""
        return [PipelineCallback(self.stage_dir, self.config.run.keep_last_checkpoints, self.metrics_log), *more]

    def train(self, trainer: Trainer, input_model: str) -> None:
        """Train from the newest complete checkpoint if there is one, under one key-figures progress bar."""
        for printing in (ProgressCallback, PrinterCallback):
            trainer.remove_callback(printing)
        trainer.add_callback(KeyFiguresBar(self.stage))
        self.wall_time = train_with_resume(trainer, self.start, self.config, self.stage, input_model, self.engine)

    def finish(self, trainer: Trainer, **manifest_fields: Any) -> Path:
        """Every process calls it, after the final model is written: the manifest says finished (the main
        process's `manifest_fields` are written); returns final/."""
        if trainer.is_world_process_zero():
            write_manifest(self.stage_dir, status="finished", steps=trainer.state.global_step,
                           wall_time_s=round(self.wall_time, 1), **manifest_fields)
        trainer.accelerator.wait_for_everyone()
        self.print(f"done: {self.final_dir}")
        return self.final_dir
