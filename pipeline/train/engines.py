"""The custom training loops (pretraining, PPO) on every engine Accelerate offers: one device or DDP, FSDP2, and
DeepSpeed ZeRO-2/3, with the same meaning everywhere. What differs between engines, read from accelerate 1.15's
and TRL's sources, and what this module does about it:

- One trainable model and one optimizer. DeepSpeed and FSDP2 refuse `prepare` with several models, so PPO's policy
  and value model train as one `PolicyAndValue` (pipeline/ppo/models.py, as TRL's PolicyAndValueWrapper did).
- Frozen models and generation under sharded weights: pipeline/train/sharding.py.
- Gradient accumulation and clipping: DeepSpeed steps its engine inside `accelerator.backward` whenever
  `accelerator.sync_gradients` is set, clips by its own `gradient_clipping`, and divides each loss by its
  `gradient_accumulation_steps`. `configure_deepspeed` writes the loop's micro-batch size, accumulation and
  max_grad_norm into its config; `accumulation_boundary` marks the last micro-batch of an optimizer step (no
  gradient sync before it on DDP and FSDP2, no engine step before it on DeepSpeed); `backward` leaves the losses
  as the loops normalised them; `clipped_gradient_norm` returns the global norm as a float tensor on every engine
  (DeepSpeed's after its step, inf when it skipped the step for a non-finite gradient).
- Saves: pipeline/train/final_save.py, one engine-aware final save for every stage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from pipeline.config.parsing import ConfigError


# ---------------------------------------------------------------- which engine
@dataclass(frozen=True)
class Engine:
    """The engine a process runs under: "single" (one device), "ddp", "fsdp2" or "zero0" … "zero3"."""

    name: str

    @property
    def deepspeed(self) -> bool:
        return self.name.startswith("zero")

    @property
    def zero_stage(self) -> int:
        return int(self.name[4:]) if self.deepspeed else 0

    @property
    def fsdp2(self) -> bool:
        return self.name == "fsdp2"

    @property
    def shards_weights(self) -> bool:
        """Whether a process holds only a shard of the weights (then saving and generation gather them)."""
        return self.fsdp2 or self.zero_stage == 3


def engine_of(accelerator: Accelerator) -> Engine:
    """The engine from `accelerator.state`; FSDP1 is refused (its wrapper forbids calling submodules directly)."""
    kind = accelerator.state.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return Engine(f"zero{accelerator.state.deepspeed_plugin.zero_stage}")
    if kind == DistributedType.FSDP:
        if not accelerator.is_fsdp2:
            raise ConfigError("run.accelerate_config: FSDP version 1 is not supported; set fsdp_version: 2 in the "
                              "Accelerate config's fsdp_config")
        return Engine("fsdp2")
    return Engine("single" if accelerator.num_processes == 1 else "ddp")


# ---------------------------------------------------------------- gradients
def configure_deepspeed(accelerator: Accelerator, micro_batch_size: int, accumulation_steps: int,
                        max_grad_norm: float) -> None:
    """Before `prepare`, under DeepSpeed: the micro-batch size (there is no DataLoader to infer it from), the
    micro-batches per optimizer step and the clipping norm the loop means, written into the engine's config so
    that it steps, clips and counts samples as the loop does on the other engines. No-op elsewhere."""
    if not engine_of(accelerator).deepspeed:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = accumulation_steps
    config["train_batch_size"] = micro_batch_size * accumulation_steps * accelerator.num_processes
    config["gradient_clipping"] = max_grad_norm
    # accelerate would otherwise warn of a mismatch and adopt the config's value at prepare.
    accelerator.gradient_accumulation_steps = accumulation_steps


@contextlib.contextmanager
def accumulation_boundary(accelerator: Accelerator, model: torch.nn.Module, last_micro_batch: bool) -> Iterator[None]:
    """Around one micro-batch's forward and backward: gradients are synchronised (DDP all-reduce, FSDP2
    reduce-scatter) and, under DeepSpeed, the engine steps, only after the last micro-batch of an optimizer step."""
    accelerator.sync_gradients = last_micro_batch
    try:
        with contextlib.nullcontext() if last_micro_batch else accelerator.no_sync(model):
            yield
    finally:
        accelerator.sync_gradients = True


def backward(accelerator: Accelerator, loss: torch.Tensor) -> None:
    """`accelerator.backward` of a loss the loop has already scaled to its share of the optimizer step.
    DeepSpeed would divide it by its gradient_accumulation_steps again; the Accelerator here is built with
    gradient_accumulation_steps 1 on the other engines, so accelerate divides by nothing."""
    if engine_of(accelerator).deepspeed:
        accelerator.backward(loss, scale_wrt_gas=False)
    else:
        accelerator.backward(loss)


def clipped_gradient_norm(accelerator: Accelerator, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """The global gradient norm before clipping, as a float32 tensor, with the gradients clipped to `max_norm`.

    On DDP and FSDP2 it clips here (before the optimizer step, which a non-finite norm must stop); DeepSpeed has
    already clipped and stepped inside the last micro-batch's backward, so its norm is read back: inf when it
    skipped the step because a gradient was not finite (bf16/fp16 overflow check), NaN/inf as computed otherwise."""
    if engine_of(accelerator).deepspeed:
        engine = accelerator.deepspeed_engine_wrapped.engine
        if not engine.was_step_applied():
            return torch.tensor(float("inf"), device=accelerator.device)
        norm = engine.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else norm, device=accelerator.device).float()
        # ZeRO-1/2 report a non-finite norm computed during offload as -1.
        return torch.where(norm < 0, torch.tensor(float("inf"), device=norm.device), norm)
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    from torch.distributed.tensor import DTensor

    if isinstance(norm, DTensor):  # FSDP2: a partial norm per shard, whole only once gathered
        norm = norm.full_tensor()
    return norm.detach().float()


# ---------------------------------------------------------------- shards
def local_values(parameter: torch.Tensor) -> torch.Tensor:
    """The values of a parameter this process holds: the local shard of an FSDP2 DTensor or of a ZeRO-3
    partitioned parameter, else the parameter itself."""
    from torch.distributed.tensor import DTensor

    if isinstance(parameter, DTensor):
        return parameter.to_local()
    shard = getattr(parameter, "ds_tensor", None)
    if shard is None or not hasattr(parameter, "ds_numel"):
        return parameter if shard is None else shard
    # ZeRO-3 pads every parameter to a multiple of the world size; the padding at the end of the last partitions
    # is torch.empty, never written (deepspeed partition_parameters.py): a 1-element bias on 2 processes leaves the
    # second process a partition of padding alone. Only the values this partition really holds.
    import torch.distributed as dist

    rank = dist.get_rank(group=getattr(parameter, "ds_process_group", None)) if dist.is_initialized() else 0
    start = shard.numel() * rank
    return shard.narrow(0, 0, max(0, min(shard.numel(), parameter.ds_numel - start)))
