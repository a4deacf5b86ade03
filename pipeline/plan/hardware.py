"""The hardware a memory plan is for: GPUs (how many, how much memory each, which engine) or CPU processes sharing
the machine's RAM; the headroom kept free on each; and how it is read from `rlhf plan`'s flags, the run's Accelerate
config and this machine."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.config.parsing import ConfigError
from pipeline.config.schema import PipelineConfig

MIB, GIB = 1024 ** 2, 1024 ** 3


ENGINES = ("ddp", "fsdp2", "zero2", "zero3")


SHARDS_WEIGHTS = ("fsdp2", "zero3")


SHARDS_OPTIMIZER_STATES = ("fsdp2", "zero2", "zero3")


# Headroom on a GPU: the CUDA context, cuBLAS/NCCL workspaces and the caching allocator's fragmentation live
# outside what the plan counts.
CUDA_CONTEXT_BYTES = 1 * GIB


FRAGMENTATION_SHARE = 0.10


# On CPU, `rlhf run` itself and `accelerate launch` stay resident beside each stage process (measured: 0.39
# and 0.27 GiB RSS), and the same 10% is kept free for the allocator and the page cache.
CPU_LAUNCHER_BYTES = 680 * MIB


@dataclass(frozen=True)
class Hardware:
    """Where the run goes: `devices` GPUs with `memory_bytes` each, or CPU processes sharing the machine's RAM."""

    kind: str  # "cuda" or "cpu"
    devices: int
    memory_bytes: int
    engine: str = "ddp"
    name: str = ""

    @property
    def deepspeed(self) -> bool:
        return self.engine in ("zero2", "zero3")

    @property
    def shards_weights(self) -> bool:
        """Whether each device holds a shard of every model's weights (frozen models included)."""
        return self.engine in SHARDS_WEIGHTS

    @property
    def shards_optimizer_states(self) -> bool:
        """Whether each device holds a shard of the gradients and optimizer states."""
        return self.engine in SHARDS_OPTIMIZER_STATES

    @property
    def usable_bytes(self) -> int:
        """Per device (per process on CPU) after the headroom stated in `headroom`."""
        if self.kind == "cuda":
            return int((self.memory_bytes - CUDA_CONTEXT_BYTES) * (1 - FRAGMENTATION_SHARE))
        return int((self.memory_bytes - CPU_LAUNCHER_BYTES) * (1 - FRAGMENTATION_SHARE)) // self.devices

    @property
    def headroom(self) -> str:
        if self.kind == "cuda":
            return f"{format_bytes(CUDA_CONTEXT_BYTES)} for the CUDA context, then {FRAGMENTATION_SHARE:.0%} for fragmentation"
        shared = f", shared by {self.devices} processes" if self.devices > 1 else ""
        return f"{format_bytes(CPU_LAUNCHER_BYTES)} for the rlhf/accelerate launchers, then {FRAGMENTATION_SHARE:.0%}{shared}"

    def describe(self) -> str:
        if self.kind == "cpu":
            return f"CPU, {self.devices} process{'es' if self.devices > 1 else ''}, {format_bytes(self.memory_bytes)} RAM available"
        return f"{self.devices} × {self.name or 'GPU'} ({format_bytes(self.memory_bytes)}), {self.engine}"


def machine_hardware(config: PipelineConfig, gpus: int | None = None, gpu_memory_gib: float | None = None,
                     engine: str | None = None) -> Hardware:
    """The hardware to plan for: what the flags say, else this machine's GPUs (as many as the run's Accelerate
    config launches processes, with its engine), else its CPU RAM (MemAvailable) shared by those processes."""
    if gpus is not None and gpus < 1:
        raise ConfigError(f"--gpus: must be at least 1, got {gpus}")
    if gpu_memory_gib is not None and gpu_memory_gib <= 0:
        raise ConfigError(f"--gpu-memory: must be positive (GiB), got {gpu_memory_gib}")
    if engine is not None and engine not in ENGINES:
        raise ConfigError(f"--engine: must be one of {', '.join(ENGINES)}; got {engine!r}")
    launched_processes, launched_engine = accelerate_launch_settings(config.run.accelerate_config)
    engine = engine or launched_engine
    if gpu_memory_gib is not None:
        return Hardware("cuda", gpus or launched_processes, int(gpu_memory_gib * GIB), engine)
    import torch

    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        return Hardware("cuda", gpus or launched_processes, properties.total_memory, engine, properties.name)
    if gpus is not None:
        raise ConfigError("--gpus: this machine has no GPU; give --gpu-memory (GiB per GPU) to plan for one")
    return Hardware("cpu", launched_processes, available_ram_bytes(), "ddp")


def accelerate_launch_settings(path: str | None) -> tuple[int, str]:
    """(processes, engine) that an Accelerate config file launches; one ddp process without one."""
    if path is None:
        return 1, "ddp"
    try:
        settings = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"run.accelerate_config: cannot read {path} ({error})") from None
    kind = str(settings.get("distributed_type", "NO")).upper()
    if kind == "DEEPSPEED":
        engine = "zero3" if int((settings.get("deepspeed_config") or {}).get("zero_stage", 2)) == 3 else "zero2"
    else:
        engine = "fsdp2" if kind == "FSDP" else "ddp"
    return int(settings.get("num_processes", 1) or 1), engine


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo: free memory plus what the kernel can reclaim without swapping."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def format_bytes(value: int) -> str:
    """`value` bytes in GiB, MiB or KiB, as the plan prints them."""
    if abs(value) >= GIB:
        return f"{value / GIB:.1f} GiB"
    return f"{value / MIB:.0f} MiB" if abs(value) >= MIB else f"{value / 1024:.0f} KiB"
