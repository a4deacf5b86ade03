"""The custom training loops (pretraining, PPO) on every engine Accelerate offers: one device or DDP, FSDP2, and
DeepSpeed ZeRO-2/3, with the same meaning everywhere. What differs between engines, read from accelerate 1.15's
and TRL's sources, and what this module does about it:

- One trainable model and one optimizer. DeepSpeed and FSDP2 refuse `prepare` with several models, so PPO's policy
  and value model train as one `PolicyAndValue` (as TRL's PolicyAndValueWrapper did), one forward giving both.
- Frozen models (PPO's reference and reward model) are placed as TRL places them: `prepare_deepspeed` (ZeRO-3
  shards them, ZeRO-0/1/2 replicate them at stage 0; in bf16 under mixed precision, as DeepSpeed holds the policy),
  `prepare_fsdp` under FSDP2 (sharded, computed through the same MixedPrecisionPolicy as the policy), else moved
  to the device. They stay fp32 on one device and DDP: the policy keeps fp32 weights under autocast there, and a
  reference cast to bf16 would differ from it by rounding, so PPO's first step would measure precision, not
  policy (KL ≠ 0, ratio ≠ 1).
- Generation needs whole weights: ZeRO-3 gathers them in TRL's `unwrap_model_for_generation`; under FSDP2 every
  FSDP unit is unsharded for the duration and kept so across decoding steps. Either way decoding forwards are
  local, so ranks may stop decoding at different steps; every forward through a sharded model (scoring, training)
  is collective, and the loops run the same number of those on every rank.
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


# ---------------------------------------------------------------- frozen models
def place_frozen_model(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """A model that only scores, placed for the engine: no gradients, eval mode; call it after `prepare` of the
    trainable model, whose preparation fills the DeepSpeed config TRL's `prepare_deepspeed` copies."""
    model.requires_grad_(False)
    model.eval()
    engine = engine_of(accelerator)
    if engine.deepspeed:
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(model, accelerator)
    if engine.fsdp2:
        from trl.models.utils import prepare_fsdp

        return prepare_fsdp(model, accelerator)
    return model.to(accelerator.device)


@contextlib.contextmanager
def gathered_if_partitioned(parameters: list[torch.nn.Parameter]) -> Iterator[None]:
    """Whole values of `parameters` for reading them between loading and `prepare`. Under ZeRO-3 transformers
    builds every model already partitioned (deepspeed.zero.Init); every process must enter this together."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parameters):
        yield


# ---------------------------------------------------------------- generation
@contextlib.contextmanager
def policy_for_generation(model: torch.nn.Module, accelerator: Accelerator) -> Iterator[torch.nn.Module]:
    """The policy of a prepared PolicyAndValue with whole weights, for as long as the block decodes. ZeRO-3 gathers
    the policy's parameters only (the critic does not decode; gathering it too would double what generation holds)
    and lifts DeepSpeed's fetch hooks meanwhile, as TRL's unwrap_model_for_generation does for a whole model; FSDP2
    unshards the root and the policy's units (`fsdp2_unsharded`); elsewhere the weights are whole."""
    unwrapped = accelerator.unwrap_model(model)
    engine = engine_of(accelerator)
    checkpointing = unwrapped.is_gradient_checkpointing
    if checkpointing:
        unwrapped.gradient_checkpointing_disable()
    try:
        if engine.zero_stage == 3:
            import deepspeed
            from trl.models.utils import add_hooks, remove_hooks

            with deepspeed.zero.GatheredParameters(list(unwrapped.policy.parameters())):
                remove_hooks(model)
                try:
                    yield unwrapped.policy
                finally:
                    add_hooks(model)
        elif engine.fsdp2:
            with fsdp2_unsharded(unwrapped, within=unwrapped.policy):
                yield unwrapped.policy
        else:
            yield unwrapped.policy
    finally:
        if checkpointing:
            unwrapped.gradient_checkpointing_enable()


# FSDP2's generation keeps units unsharded across forwards through torch internals with no public equivalent in
# torch 2.6-2.14 (pyproject pins torch to those): checked before training, so that a torch that renamed them fails
# with one line instead of a deadlock or an AttributeError at the first rollout.
FSDP2_INTERNALS = ("FSDPModule._get_fsdp_state", "FSDPState._lazy_init", "FSDPState._fsdp_param_groups",
                   "FSDPParamGroup.post_forward_mesh_info")


def require_fsdp2_internals() -> None:
    """ConfigError unless this torch has the FSDP2 internals `fsdp2_unsharded` uses."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    present = (hasattr(FSDPModule, "_get_fsdp_state") and hasattr(FSDPState, "_lazy_init")
               and "_fsdp_param_groups" in FSDPState.__init__.__code__.co_names
               and "post_forward_mesh_info" in FSDPParamGroup.__init__.__code__.co_names)
    if not present:
        raise ConfigError(f"run.accelerate_config: FSDP2 generation needs torch internals ({', '.join(FSDP2_INTERNALS)}) "
                          f"that torch {torch.__version__} lacks; install a torch from 2.6 to 2.14.1 or use DeepSpeed")


@contextlib.contextmanager
def fsdp2_unsharded(root: torch.nn.Module, within: torch.nn.Module | None = None) -> Iterator[None]:
    """The FSDP2 root and every FSDP2 unit inside `within` (default: all under `root`) all-gathered on entry and kept
    whole across forwards until exit, so that forwards through them meanwhile are local (no collective per decoding
    step) and may differ in number between ranks. Every process must enter and leave together (the gather and the
    reshard are per process, the gather collective)."""
    from torch.distributed.fsdp import FSDPModule

    inside = {id(module) for module in (within or root).modules()}
    units = [module for module in root.modules()
             if isinstance(module, FSDPModule) and (module is root or id(module) in inside)]
    if not units:
        yield
        return
    # FSDP2 makes the first unit to run forward the root of its tree; decoding runs the policy's layers without
    # the root's forward, so settle the root before anything else runs (a no-op once a forward went through it).
    units[0]._get_fsdp_state()._lazy_init()
    # torch 2.13 has no public way to read a unit's reshard-after-forward setting back, and
    # set_reshard_after_forward cannot restore the root's "auto" one: keep each parameter group's own setting
    # (None means "stay unsharded after forward") and put it back afterwards.
    groups = [group for unit in units for group in unit._get_fsdp_state()._fsdp_param_groups]
    saved = [group.post_forward_mesh_info for group in groups]
    for group in groups:
        group.post_forward_mesh_info = None
    try:
        for unit in units:
            unit.unshard()
        yield
    finally:
        for group, setting in zip(groups, saved):
            group.post_forward_mesh_info = setting
        for unit in units:
            unit.reshard()


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
