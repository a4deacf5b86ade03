"""Will it fit? The memory each stage of a run needs per device, worked out from the config before anything runs.

    rlhf plan configs/gpu.yaml --gpus 4 --gpu-memory 24 --engine zero3

For every stage, at its peak (the training step; for PPO the worst of rollout, scoring and update; for the
reward stage also the normalisation pass after training) the plan counts, per device:
- weights of every model the stage holds (PPO: trainable policy and critic, frozen reference — none with LoRA,
  where the reference is the policy with its adapter off — and frozen reward model);
- gradients and AdamW states of what trains (only the adapters under LoRA), as the engines keep them:
  ddp and fsdp2 keep fp32 weights (bf16 only through autocast), so 4 + 4 + 8 bytes per parameter; DeepSpeed
  keeps bf16 weights and gradients under mixed precision plus an fp32 master copy with the optimizer, 2 + 2 + 12;
  zero2 shards gradients and optimizer states over the GPUs, zero3 and fsdp2 the weights too (frozen models
  included), and gather a layer or two at a time to compute (and the whole policy to generate);
- activations saved for backward at the configured micro-batch and length (a Llama-style decoder layer,
  per token: two RMSNorms, q/k/v, RoPE, attention output, SwiGLU; the attention matrix too where attention runs
  eagerly, i.e. bf16 on CPU; only the layer inputs under gradient checkpointing), and the vocabulary logits
  with their fp32 log-softmax and gradients;
- PPO's generation KV cache: local_rollout_forward_batch_size × (prompt + response_length) × layers × 2 ×
  kv_heads × head_dim × bytes;
- the runtime: on CPU the measured resident size of a stage process before its model grows (Python, torch,
  transformers, TRL, tokenizers, first-use allocations); on a GPU nothing, the CUDA context is in the headroom.

Lengths are upper bounds: sequences are padded to the longest in a batch, which is at most the configured
max_length (PPO: prompts at most reward.max_length, or the context less response_length), so the plan is what
the worst batch needs. Checked on CPU against the peak RSS of each stage (`/usr/bin/time -v python -m
stages.<stage>`, 2 cores, 2026-11-26): the runtime constants come from the smoke preset; on the default preset,
at the longest sequences the run actually had, the plan is within 6% of the measured peak per stage (pretrain
+6%, SFT +5%, reward −1%, PPO −6%), and at the configured length bounds above it (+6%, +35%, +57%, +20%), as an
upper bound should be. The saved-activation count of a decoder layer matches autograd's saved tensors of a
4×128 Llama within 3%. On GPU it has not been checked yet.

Where each part lives: the model's shape and parameter counts in model_shape, the hardware and its headroom in
hardware, per-engine weights, gradients and optimizer states in model_state_memory, activations and KV cache in
activation_memory, each stage's peak in stage_memory; this module plans the run, searches the knobs that would make
a stage fit, refuses a run that cannot, and prints the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.config.loading import config_from_mapping
from pipeline.config.parsing import ConfigError
from pipeline.config.schema import STAGES, PipelineConfig
from pipeline.plan.hardware import Hardware, format_bytes, machine_hardware
from pipeline.plan.model_shape import ModelShape, model_shape
from pipeline.plan.stage_estimates import StageEstimate, stage_estimate

LORA_RANK_SUGGESTED = 16


@dataclass
class Knob:
    """A change that brings a stage within memory: config overrides and/or another engine or GPU count."""

    label: str
    overrides: list[str] = field(default_factory=list)
    engine: str | None = None
    devices: int | None = None
    total: int = 0

    def describe(self) -> str:
        changes = " ".join(self.overrides + ([f"--engine {self.engine}"] if self.engine else [])
                           + ([f"--gpus {self.devices}"] if self.devices else []))
        return f"{self.label} → {format_bytes(self.total)}   ({changes})"


@dataclass
class StagePlan:
    estimate: StageEstimate
    usable_bytes: int
    knobs: list[Knob] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.estimate.total <= self.usable_bytes


# ---------------------------------------------------------------- the run
def plan_run(config: PipelineConfig, hardware: Hardware) -> list[StagePlan]:
    """The plan of every stage of the run, with knobs for those that do not fit."""
    shape = model_shape(config)
    plans = []
    for stage in (s for s in STAGES if s in config.run.stages):
        plan = StagePlan(stage_estimate(config, stage, hardware, shape), hardware.usable_bytes)
        if not plan.fits:
            plan.knobs = knobs_that_fit(config, stage, hardware, shape)
        plans.append(plan)
    return plans


def check_run_fits(config: PipelineConfig, hardware: Hardware | None = None) -> None:
    """Refuse, with one line naming the stage and the shortfall, a run that cannot fit this machine."""
    hardware = hardware or machine_hardware(config)
    for plan in plan_run(config, hardware):
        if not plan.fits:
            estimate = plan.estimate
            hint = f"; e.g. {plan.knobs[0].label} → {format_bytes(plan.knobs[0].total)}" if plan.knobs else ""
            where = config.source or "CONFIG"
            raise ConfigError(
                f"{estimate.stage}: needs {format_bytes(estimate.total)} per device at its {estimate.phase} peak, "
                f"{format_bytes(estimate.total - plan.usable_bytes)} more than the {format_bytes(plan.usable_bytes)} "
                f"usable on {hardware.describe()}{hint} (`rlhf plan {where}` lists what would fit)")


# ---------------------------------------------------------------- what would make it fit
def knobs_that_fit(config: PipelineConfig, stage: str, hardware: Hardware, shape: ModelShape) -> list[Knob]:
    """Each change that alone makes `stage` fit (the largest micro-batch that fits; the fewest GPUs per engine);
    when none does alone, LoRA and gradient checkpointing together with the largest micro-batch that fits."""
    usable = hardware.usable_bytes

    def total(overrides: list[str], on: Hardware = hardware) -> int:
        changed = config_with_overrides(config, overrides) if overrides else config
        return stage_estimate(changed, stage, on, shape).total

    memory_savers: list[tuple[str, list[str]]] = []
    if stage in ("sft", "reward", "ppo") and not stage_setting(config, stage, "peft"):
        memory_savers.append((f"LoRA r={LORA_RANK_SUGGESTED}", [f"{stage}.peft={{r: {LORA_RANK_SUGGESTED}}}"]))
    if stage in ("sft", "reward") and not stage_setting(config, stage, "gradient_checkpointing"):
        memory_savers.append(("gradient checkpointing", [f"{stage}.gradient_checkpointing=true"]))
    knobs = [Knob(label, overrides, total=t) for label, overrides in memory_savers if (t := total(overrides)) <= usable]

    def largest_fitting_micro_batch(prefix: list[str]) -> Knob | None:
        for micro in smaller_divisors(micro_batch_size(config, stage)):
            overrides = prefix + micro_batch_overrides(config, stage, micro)
            if (t := total(overrides)) <= usable:
                return Knob(f"{stage}.per_device_train_batch_size {micro}", overrides, total=t)
        return None

    if knob := largest_fitting_micro_batch([]):
        knobs.append(knob)
    if stage == "ppo":
        for chunk in smaller_divisors(config.ppo.local_rollout_forward_batch_size):
            overrides = [f"ppo.local_rollout_forward_batch_size={chunk}"]
            if (t := total(overrides)) <= usable:
                knobs.append(Knob(f"ppo.local_rollout_forward_batch_size {chunk}", overrides, total=t))
                break
    if hardware.kind == "cuda":
        for engine in ("zero2", "zero3", "fsdp2"):
            for devices in sorted({hardware.devices} | {2 ** k for k in range(1, 7) if 2 ** k > hardware.devices}):
                on = replace(hardware, engine=engine, devices=devices)
                if (t := total([], on)) <= on.usable_bytes:
                    knobs.append(Knob(f"{engine} on {devices} GPU{'s' if devices > 1 else ''}", engine=engine,
                                      devices=devices if devices != hardware.devices else None, total=t))
                    break
    if not knobs and memory_savers:
        together = [o for _, overrides in memory_savers for o in overrides]
        label = " + ".join(label for label, _ in memory_savers)
        if (t := total(together)) <= usable:
            knobs.append(Knob(label, together, total=t))
        elif knob := largest_fitting_micro_batch(together):
            knobs.append(replace(knob, label=f"{label} + {knob.label}"))
    return knobs


def config_with_overrides(config: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    """A copy of `config` with `key=value` overrides applied, typed as load_config types them."""
    changed = config_from_mapping(config.to_dict(), overrides)
    changed.source = config.source
    return changed


def stage_setting(config: PipelineConfig, stage: str, key: str) -> Any:
    """A setting of a stage's section, None when unset: sft and reward are dicts of TRL arguments, the others
    dataclasses."""
    section = getattr(config, stage)
    return section.get(key) if isinstance(section, dict) else getattr(section, key, None)


def micro_batch_size(config: PipelineConfig, stage: str) -> int:
    return stage_setting(config, stage, "per_device_train_batch_size") or 8


def micro_batch_overrides(config: PipelineConfig, stage: str, micro: int) -> list[str]:
    """Micro-batch `micro` with the gradient accumulation that keeps the effective batch (and PPO's rollout)."""
    accumulation = (stage_setting(config, stage, "gradient_accumulation_steps") or 1) \
        * micro_batch_size(config, stage) // micro
    return [f"{stage}.per_device_train_batch_size={micro}", f"{stage}.gradient_accumulation_steps={accumulation}"]


def smaller_divisors(value: int) -> list[int]:
    return [d for d in range(value - 1, 0, -1) if value % d == 0]


# ---------------------------------------------------------------- printing
def format_plan(plans: list[StagePlan], hardware: Hardware) -> str:
    """The table `rlhf plan` prints, then for each stage that does not fit the knobs that would make it fit."""
    lines = [f"Planning for {hardware.describe()}; usable per {'process' if hardware.kind == 'cpu' else 'GPU'}: "
             f"{format_bytes(hardware.usable_bytes)} (headroom: {hardware.headroom})"]
    columns = ("stage", "peak at", "weights", "grads", "optimizer", "activations", "kv cache", "runtime", "total", "fits")
    rows = [columns]
    for plan in plans:
        e = plan.estimate
        rows.append((e.stage, e.phase, *(format_bytes(v) for v in (e.weights, e.gradients, e.optimizer_states,
                                                                  e.activations, e.kv_cache, e.runtime, e.total)),
                     "yes" if plan.fits else "NO"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines += ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
              for row in rows]
    lines += [f"  {plan.estimate.stage}: {plan.estimate.models}" for plan in plans]
    for plan in plans:
        if plan.fits:
            continue
        short = format_bytes(plan.estimate.total - plan.usable_bytes)
        if plan.knobs:
            lines.append(f"{plan.estimate.stage} does not fit ({short} short); any one of these would fit:")
            lines += [f"  {knob.describe()}" for knob in plan.knobs]
        else:
            lines.append(f"{plan.estimate.stage} does not fit ({short} short), and no single knob the plan tries "
                         f"(LoRA, gradient checkpointing, micro-batch, ZeRO/FSDP) makes it fit")
    return "\n".join(lines)
