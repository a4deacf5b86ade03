"""The engine a stage was launched for, an Accelerator that really is that engine (also on a machine without a
GPU), and the check that a stage got what its launch config asked for.

`accelerate launch --config_file X` tells each process what to run as environment variables (accelerate
`utils/launch.py`): ACCELERATE_USE_DEEPSPEED and ACCELERATE_DEEPSPEED_ZERO_STAGE, ACCELERATE_USE_FSDP and
FSDP_VERSION, WORLD_SIZE. Read from accelerate 1.16's `state.py`, stock Accelerate silently runs another engine
on CPU, and exits 0:
- DeepSpeed: AcceleratorState takes its DeepSpeed branch only when `cpu` is false, and ACCELERATE_USE_CPU=1 forces
  cpu (plain DDP). Without it, no backend is found on a machine without CUDA and every rank believes it is process
  0 of 1. An explicit gloo process group (InitProcessGroupKwargs) makes the ranks count, and DeepSpeed then picks
  its CPU accelerator (DS_ACCELERATOR=cpu says so without a warning).
- FSDP: the state switches to FSDP only for GPU-like distributed types, not MULTI_CPU: DDP with ACCELERATE_USE_CPU,
  else DistributedType.NO (each rank trains alone). Here the Accelerator is built on CPU (gloo group, right ranks)
  and its state switched to FSDP with the launcher's FSDP plugin, as accelerate's own branch would do on a GPU.
The TRL Trainer stages share the state built here: `trainer_engine_arguments` makes their TrainingArguments use
the already configured state (`use_configured_state`), so their Trainer gets the same engine.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
from accelerate import Accelerator

from pipeline.config.parsing import ConfigError
from pipeline.train.engines import engine_of


@dataclass(frozen=True)
class EngineRecord:
    """What a stage runs on: engine (single / ddp / zero0-3 / fsdp1 / fsdp2), processes, mixed precision."""

    engine: str
    processes: int
    mixed_precision: str

    def describe(self) -> str:
        return f"{self.engine} on {self.processes} process(es), mixed precision {self.mixed_precision}"

    def as_manifest(self) -> dict:
        return asdict(self)


def _flag(environ, name: str) -> bool:
    return environ.get(name, "false").lower() in ("1", "true", "yes")


def launched_engine(environ=None) -> tuple[str, int]:
    """(engine, processes) that the launcher asked this process to run, from the environment `accelerate launch`
    sets; a process started without a launcher is "single"."""
    environ = os.environ if environ is None else environ
    processes = int(environ.get("WORLD_SIZE", "1") or 1)
    if _flag(environ, "ACCELERATE_USE_DEEPSPEED"):
        return f"zero{int(environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2') or 2)}", processes
    if _flag(environ, "ACCELERATE_USE_FSDP"):
        return f"fsdp{int(environ.get('FSDP_VERSION', '1') or 1)}", processes
    return ("ddp" if processes > 1 else "single"), processes


def engine_accelerator(mixed_precision: str = "no", **kwargs) -> Accelerator:
    """An Accelerator running the launched engine. On a GPU machine, or in one process, it is plain Accelerator."""
    engine, processes = launched_engine()
    if torch.cuda.is_available() or processes < 2:
        return Accelerator(mixed_precision=mixed_precision, **kwargs)
    if engine.startswith("zero"):
        from accelerate.utils import InitProcessGroupKwargs

        os.environ.pop("ACCELERATE_USE_CPU", None)  # it would drop DeepSpeed (AcceleratorState: `and not cpu`)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        handlers = list(kwargs.pop("kwargs_handlers", None) or []) + [InitProcessGroupKwargs(backend="gloo")]
        return Accelerator(mixed_precision=mixed_precision, kwargs_handlers=handlers, **kwargs)
    if engine.startswith("fsdp"):
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* environment
        accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision, **kwargs)
        state = accelerator.state
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        return accelerator
    return Accelerator(mixed_precision=mixed_precision, **kwargs)


def require_launched_engine(accelerator: Accelerator, mixed_precision: str, stage: str) -> EngineRecord:
    """The engine, process count and mixed precision the Accelerator actually runs, for the manifest; a ConfigError
    (one line, before training) when they differ from what the launch asked for or the stage's config sets."""
    got = EngineRecord(engine_of(accelerator).name, accelerator.num_processes, accelerator.mixed_precision)
    engine, processes = launched_engine()
    asked = EngineRecord(engine, processes, mixed_precision)
    if got != asked:
        raise ConfigError(f"{stage}: run.accelerate_config asked for {asked.describe()}, but Accelerate runs "
                          f"{got.describe()}; nothing was trained (check the launch config and the installed "
                          f"accelerate/deepspeed)")
    return got


def trainer_engine_arguments(accelerator: Accelerator) -> dict:
    """TrainingArguments fields that make a transformers/TRL Trainer run on the Accelerator state already built by
    `engine_accelerator` (its engine, process group and mixed precision) instead of building its own."""
    return {"accelerator_config": {"use_configured_state": True}, "bf16": accelerator.mixed_precision == "bf16"}
