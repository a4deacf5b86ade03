"""The run directory: where each stage keeps its checkpoints, final model, manifest and metrics.

    runs/<name>/data/                      the built-in task, generated once
    runs/<name>/<stage>/checkpoint-<step>/ resumable training state, written atomically
    runs/<name>/<stage>/final/             the stage's model in HF format, read by the next stage
    runs/<name>/<stage>/manifest.json      config used, input checkpoint, steps, metrics, wall time, versions
    runs/<name>/<stage>/metrics.jsonl      one line per logged step
    runs/<name>/ppo/policy-step-<step>/    the PPO policy every ppo.policy_snapshot_steps, HF format, never pruned

A checkpoint counts only once its completion marker exists. Our own stages write into a hidden temporary
directory and rename it into place (atomic on POSIX); HF Trainer's checkpoints, written in place, get their
marker from a callback after the Trainer has finished writing. A kill at any moment therefore leaves either
no new checkpoint or a complete one, never a broken "latest".
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.run.files import TEMPORARY_PREFIX, OutputWriteError, atomic_directory, write_json_atomically

COMPLETE_MARKER = "checkpoint_complete.json"


CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


POLICY_SNAPSHOT_PATTERN = re.compile(r"^policy-step-(\d+)$")


def mark_checkpoint_complete(checkpoint_dir: Path, step: int) -> None:
    write_json_atomically(Path(checkpoint_dir) / COMPLETE_MARKER, {"step": step, "time": time.time()})


def is_complete_checkpoint(path: Path) -> bool:
    return path.is_dir() and CHECKPOINT_PATTERN.match(path.name) is not None and (path / COMPLETE_MARKER).is_file()


def checkpoint_step(path: Path) -> int:
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint-<step> directory")
    return int(match.group(1))


def complete_checkpoints(stage_dir: Path) -> list[Path]:
    """Complete checkpoints of a stage, oldest step first."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return []
    return sorted((p for p in stage_dir.iterdir() if is_complete_checkpoint(p)), key=checkpoint_step)


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None; incomplete ones (killed mid-save) are ignored."""
    found = complete_checkpoints(stage_dir)
    return found[-1] if found else None


def policy_snapshot_dir(stage_dir: Path, step: int) -> Path:
    """Where a stage writes its policy after `step` steps (ppo.policy_snapshot_steps)."""
    return Path(stage_dir) / f"policy-step-{step}"


def policy_snapshots(stage_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every policy snapshot of a stage, oldest first. Each is written atomically, so one
    that is there is whole; half-written ones carry the temporary prefix and do not match."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in stage_dir.iterdir()
             if path.is_dir() and (match := POLICY_SNAPSHOT_PATTERN.match(path.name))]
    return sorted(found)


def prune_checkpoints(stage_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and any incomplete one older than those."""
    stage_dir = Path(stage_dir)
    complete = complete_checkpoints(stage_dir)
    for path in complete[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    if not complete:
        return
    newest_kept = checkpoint_step(complete[-1])
    for path in stage_dir.iterdir():
        if CHECKPOINT_PATTERN.match(path.name) and not is_complete_checkpoint(path) and checkpoint_step(path) < newest_kept:
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(TEMPORARY_PREFIX) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def save_training_checkpoint(accelerator, stage_dir: Path, step: int, state: dict[str, Any], keep_last: int,
                             write_extra: Callable[[Path], None] | None = None) -> None:
    """Accelerate's state (models, optimizers, RNG of every process) plus `state` as trainer_state.json and
    whatever `write_extra` adds, renamed into checkpoint-<step> atomically; then older ones are pruned."""
    stage_dir = Path(stage_dir)
    temporary = stage_dir / f"{TEMPORARY_PREFIX}state-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(temporary))  # every process writes its own RNG file
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise OutputWriteError(f"could not write checkpoint-{step} in {stage_dir}: {error.strerror or error}; the "
                               f"previous checkpoints are intact (free space or fix permissions, then resume)") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            with atomic_directory(stage_dir / f"checkpoint-{step}") as staging:
                for path in temporary.iterdir():
                    path.rename(staging / path.name)
                if write_extra is not None:
                    write_extra(staging)
                write_json_atomically(staging / "trainer_state.json", {"global_step": step, **state})
                mark_checkpoint_complete(staging, step)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
        prune_checkpoints(stage_dir, keep_last)
    accelerator.wait_for_everyone()


def read_trainer_state(checkpoint_dir: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint_dir) / "trainer_state.json").read_text(encoding="utf-8"))
