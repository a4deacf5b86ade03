"""NaN/inf never reaches a checkpoint: the guards our training loops run before an optimizer step and before a
save, and the points in those loops where the reliability tests inject faults to exercise them.
"""

from __future__ import annotations

import importlib
import math
import os

import torch

FAULT_HOOKS_VARIABLE = "RLHF_FAULT_HOOKS"


def fault_point(point: str, stage: str, step: int, model: torch.nn.Module | None = None) -> None:
    """A place in a training loop where the reliability tests inject a fault: "step" at the start of step `step`
    (counted from 0), "update" once its experience is in and before its forward-backward passes (poisoned weights
    make the loss NaN), "gradients" after its backward passes and before the gradient norm is taken. Nothing
    happens unless RLHF_FAULT_HOOKS names a module (the tests' tests/faults/injection.py), whose `inject` is then
    called with the same arguments."""
    hooks = os.environ.get(FAULT_HOOKS_VARIABLE)
    if hooks:
        importlib.import_module(hooks).inject(point, stage, step, model)


def weights_are_finite(model: torch.nn.Module) -> bool:
    # One flag per tensor, stacked: a single device-to-host sync, not one per parameter. Under FSDP2 and ZeRO-3 a
    # process checks the shard it holds (require_finite_weights sums the flags over processes).
    from pipeline.train.engines import local_values

    flags = [torch.isfinite(local_values(p)).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def finite_on_every_process(model: torch.nn.Module) -> bool:
    """Whether every process holds finite weights (each checks the shard it holds); a collective: every process
    calls it and all get the same answer, so that none raises while the others wait in the next collective."""
    from accelerate import PartialState

    state = PartialState()
    flag = torch.tensor(float(not weights_are_finite(model)), device=state.device)
    if state.num_processes > 1:
        torch.distributed.all_reduce(flag)
    return flag.item() == 0


def require_finite_gradient_norms(norms: dict[str, torch.Tensor | float], stage: str, step: int, setting: str) -> None:
    """Stop before the optimizer step when a gradient norm is NaN/inf: the step would write non-finite weights,
    which the next save would keep. `step` is the step being taken (1-based, as checkpoints are numbered);
    `setting` is the config key to lower."""
    for name, norm in norms.items():
        value = float(norm)
        if not math.isfinite(value):
            raise FloatingPointError(f"{stage}: the gradient norm of the {name} became {value} at step {step}; the "
                                     f"optimizer step was skipped and the last good checkpoint is kept (lower "
                                     f"{setting} and resume)")


def require_finite_weights(models: dict[str, torch.nn.Module], stage: str, step: int, accelerator) -> None:
    """Refuse to save non-finite weights. Every process calls it; the flags are summed over processes so that all
    stop together, also where each holds only a shard of the weights."""
    flags = torch.tensor([float(not weights_are_finite(model)) for model in models.values()], device=accelerator.device)
    flags = accelerator.reduce(flags, reduction="sum")
    bad = [name for name, flag in zip(models, flags.tolist()) if flag > 0]
    if bad:
        raise FloatingPointError(f"{stage}: the {bad[0]}'s weights are not finite at step {step}; nothing was saved "
                                 f"and the last good checkpoint is kept")
