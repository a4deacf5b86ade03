"""`rlhf run`: each stage as a process of its own, skipping finished stages, resuming the rest.

With a run.accelerate_config (several processes, FSDP, DeepSpeed, several machines) a stage is `accelerate launch`ed.
Without one it is one local process, forked from a server that has imported the stages' libraries once
(`LocalStageLauncher`): torch, transformers, TRL and datasets take 5–7 s to import, more than a stage of the smoke
preset takes to train, and `accelerate launch` adds its own 2–3 s. The server itself never runs a tensor
operation or a tokenizer, so forking it is safe (no thread pools to inherit), and every stage still gets a fresh
process: nothing a stage leaves in memory or in a library's global state reaches the next.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config.parsing import ConfigError
from pipeline.config.schema import PipelineConfig
from pipeline.run.checkpoints import checkpoint_step, latest_checkpoint
from pipeline.run.manifests import read_manifest
from pipeline.run.stage_graph import STAGE_GRAPH, stale_reason
from pipeline.run.start import plan_stage_start


class StageFailed(RuntimeError):
    def __init__(self, stage: str, code: int):
        super().__init__(f"stage {stage} failed with exit code {code}; fix the cause and re-run: finished stages "
                         f"are skipped and {stage} resumes from its newest checkpoint")
        self.stage, self.code = stage, code


def machine_rank(config: PipelineConfig) -> int:
    """This machine's rank in a multi-machine launch: run.machine_rank, else the Accelerate config's, else 0."""
    if config.run.machine_rank is not None:
        return config.run.machine_rank
    if not config.run.accelerate_config:
        return 0
    import yaml

    settings = yaml.safe_load(Path(config.run.accelerate_config).read_text(encoding="utf-8")) or {}
    return int(settings.get("machine_rank", 0) or 0)


@contextmanager
def run_directory_lock(run_dir: Path, machine: int = 0) -> Iterator[None]:
    """One `rlhf run` per run directory and machine rank: a second one fails at once instead of corrupting
    checkpoints. The machines of a multi-machine run share the directory, each under its own lock."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / (".lock" if machine == 0 else f".lock-machine-{machine}"), "a+")
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


def launch_command(config: PipelineConfig, stage: str, overrides: list[str]) -> list[str]:
    """`accelerate launch` of one stage with the run's Accelerate config."""
    machines = []
    if config.run.machine_rank is not None:
        machines += ["--machine_rank", str(config.run.machine_rank)]
    if config.run.main_process_ip is not None:
        machines += ["--main_process_ip", config.run.main_process_ip]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config.run.accelerate_config,
            *machines, "-m", f"stages.{stage}", *stage_arguments(config, overrides)]


def stage_environment(config: PipelineConfig) -> dict[str, str]:
    """What a stage process's environment adds to this one's."""
    environment = {"PYTHONUNBUFFERED": "1"}
    if not config.run.accelerate_config and "OMP_NUM_THREADS" not in os.environ:
        # `accelerate launch` pins a lone CPU process to one thread unless told otherwise: give it every core.
        environment["OMP_NUM_THREADS"] = str(os.cpu_count() or 1)
    if not torch.cuda.is_available() and "ACCELERATE_USE_CPU" not in os.environ:
        # Without it a multi-process launch on a machine with no GPU runs processes that each think they are
        # alone; with it they form one DDP group over gloo (configs/accelerate/cpu_ddp.yaml). DeepSpeed and FSDP2
        # stages build their Accelerator without it (pipeline/train/engine_launch.py).
        environment["ACCELERATE_USE_CPU"] = "1"
    if not torch.cuda.is_available():
        environment.setdefault("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
    return environment


def run_stage_in_this_process(stage: str, arguments: list[str], threads: int | None = None,
                              log_path: Path | None = None) -> None:
    """The body of a forked stage process: the stage's own entry point, as `python -m stages.<stage>` runs it;
    with `log_path` its output goes to that file (appended)."""
    import importlib

    if log_path is not None:
        with open(log_path, "a", encoding="utf-8") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
    # The server imported torch before OMP_NUM_THREADS could matter to it; a forked child reads its thread count
    # afresh at its first operation, from the environment the server was started with.
    torch.set_num_threads(threads or int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    importlib.import_module(f"stages.{stage}").main(arguments)


class LocalStageLauncher:
    """Stages as local processes forked from a server that has imported them (multiprocessing's forkserver with
    the stage modules preloaded). `start` it early: the server imports while this process checks the config."""

    def __init__(self, config: PipelineConfig):
        os.environ.update(stage_environment(config))  # the server and every stage forked from it inherit it
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload([f"stages.{stage}" for stage in STAGE_GRAPH])

    def start(self) -> LocalStageLauncher:
        from multiprocessing import forkserver

        forkserver.ensure_running()
        return self

    def run(self, stage: str, arguments: list[str], threads: int | None = None, log_path: Path | None = None) -> int:
        """Run one stage to its end; its exit code (negative: the signal that ended it). `threads` overrides the
        thread count (several stages at once share the cores); `log_path` takes its output."""
        process = self.context.Process(target=run_stage_in_this_process, args=(stage, arguments, threads, log_path),
                                       name=stage)
        process.start()
        process.join()
        return process.exitcode


def stage_arguments(config: PipelineConfig, overrides: list[str]) -> list[str]:
    """A stage's command-line arguments: the run's config file and its key=value overrides."""
    return (["--config", config.source] if config.source else []) + list(overrides)


@dataclass
class StageOutcome:
    stage: str
    status: str  # "ran", "skipped"
    steps: int | None
    wall_time_s: float | None
    key_metric: str
    value: float | None


def run_stages(config: PipelineConfig, overrides: list[str], restart: set[str],
               local_launcher: LocalStageLauncher | None = None, threads: int | None = None,
               log_path: Path | None = None) -> list[StageOutcome]:
    """Run the configured stages in order; raise StageFailed naming the first one that fails. Without
    run.accelerate_config each runs in a process forked by `local_launcher` (one is made if none is given).

    Each stage is planned here, just before it would start and after its upstream stages have run: a finished
    stage whose input models changed since it was trained (an upstream stage re-ran, model.name_or_path points
    elsewhere) is stale, so its outputs are set aside and it runs again, and so, in turn, does every stage after
    it whose inputs that changes. With `log_path` the banners and the stages' output go to that file, and
    `threads` sets each local stage's thread count (a sweep trains several small models at once)."""
    outcomes = []
    banner = print_banner if log_path is None else lambda text: append_banner(log_path, text)
    # On the other machines of a multi-machine run this process only reads the run directory: the stage processes
    # of rank 0 decide and move files, and the stage processes of every machine make the same decision.
    main_machine = machine_rank(config) == 0
    for stage in config.run.stages:
        start = plan_stage_start(config, stage, restart=stage in restart,
                                 is_main_process=main_machine)
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
        if config.run.accelerate_config:
            with open(log_path or os.devnull, "a", encoding="utf-8") as log:
                code = subprocess.call(launch_command(config, stage, overrides),
                                       env={**os.environ, **stage_environment(config)},
                                       **({"stdout": log, "stderr": subprocess.STDOUT} if log_path else {}))
        else:
            local_launcher = local_launcher or LocalStageLauncher(config).start()
            code = local_launcher.run(stage, stage_arguments(config, overrides), threads, log_path)
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


def print_banner(text: str) -> None:
    print(f"\n==== {text} ====", flush=True)


def append_banner(log_path: Path, text: str) -> None:
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n==== {text} ====\n")


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
        engine = manifest.get("engine")
        on = f" on {engine['engine']} × {engine['processes']}" if engine else ""
        return f"done        {manifest.get('steps')} steps in {manifest.get('wall_time_s', 0):.0f}s{on}"
    latest = latest_checkpoint(stage_dir)
    if manifest or latest:
        total = (manifest or {}).get("max_steps", "?")
        step = checkpoint_step(latest) if latest else 0
        return f"in progress step {step} of {total} (newest complete checkpoint)"
    return "pending"
