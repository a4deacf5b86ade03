"""Whole weights where an engine shards them, and frozen models placed as the engine wants them.

- Frozen models (PPO's reference and reward model) are placed as TRL places them: `prepare_deepspeed` (ZeRO-3
  shards them, ZeRO-0/1/2 replicate them at stage 0; in bf16 under mixed precision, as DeepSpeed holds the policy),
  `prepare_fsdp` under FSDP2 (sharded, computed through the same MixedPrecisionPolicy as the policy), else moved
  to the device. They stay fp32 on one device and DDP: the policy keeps fp32 weights under autocast there, and a
  reference cast to bf16 would differ from it by rounding, so PPO's first step would measure precision, not
  policy (KL ≠ 0, ratio ≠ 1).
- Generation needs whole weights: ZeRO-3 gathers them (`deepspeed.zero.GatheredParameters`, as TRL's
  `unwrap_model_for_generation`); under FSDP2 every FSDP unit is unsharded for the duration and kept so across
  decoding steps (`fsdp2_unsharded`). Either way decoding forwards are local, so ranks may stop decoding at
  different steps; every forward through a sharded model (scoring, training) is collective, and the loops run the
  same number of those on every rank.
"""

from __future__ import annotations

from pipeline.train.engines import engine_of

import contextlib
from collections.abc import Iterator
import torch
from accelerate import Accelerator
from pipeline.config.parsing import ConfigError


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
