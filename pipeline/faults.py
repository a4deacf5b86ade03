"""NaN/inf never reaches a checkpoint: the guards our training loops run before an optimizer step and before a
save, and the fault injection the reliability tests exercise them with.

`RLHF_INJECT_NAN=<stage>:<step>` poisons a weight with NaN just before that optimizer step, so the loss really
turns NaN; `RLHF_INJECT_NAN_GRADIENT=<stage>:<step>` poisons a gradient after that step's backward passes, so
the loss stays finite and only the gradient norm shows it: the case a loss check alone lets through to the next
checkpoint. `RLHF_HALT_AT=<stage>:<step>` stops every process of the stage dead (a wait, nothing more) at the
start of that step, after touching the file RLHF_HALT_FILE names: a test then kills the whole run with SIGKILL at
a known point, also where the stage's processes live in sessions of their own (torchrun's). Steps are counted from
0, as the loops count them before the optimizer step.
"""

from __future__ import annotations

import math
import os

import torch

NAN_VARIABLE = "RLHF_INJECT_NAN"
NAN_GRADIENT_VARIABLE = "RLHF_INJECT_NAN_GRADIENT"
HALT_VARIABLE, HALT_FILE_VARIABLE = "RLHF_HALT_AT", "RLHF_HALT_FILE"


def poison_weights_if_requested(stage: str, step: int, model: torch.nn.Module) -> None:
    """Fill the first trainable parameter with NaN when the environment asks for it at this stage and step."""
    if os.environ.get(NAN_VARIABLE) != f"{stage}:{step}":
        return
    parameter = next(p for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        parameter.fill_(float("nan"))


def halt_if_requested(stage: str, step: int) -> None:
    """Wait forever at this stage and step when the environment asks for it (see the module docstring)."""
    if os.environ.get(HALT_VARIABLE) != f"{stage}:{step}":
        return
    import time
    from pathlib import Path

    Path(os.environ[HALT_FILE_VARIABLE]).touch()
    while True:
        time.sleep(1)


def poison_gradients_if_requested(stage: str, step: int, model: torch.nn.Module) -> None:
    """Fill the gradient of the first parameter that has one with NaN when the environment asks for it."""
    if os.environ.get(NAN_GRADIENT_VARIABLE) != f"{stage}:{step}":
        return
    parameter = next(p for p in model.parameters() if p.grad is not None)
    parameter.grad.fill_(float("nan"))


def weights_are_finite(model: torch.nn.Module) -> bool:
    # One flag per tensor, stacked: a single device-to-host sync, not one per parameter. Under FSDP2 and ZeRO-3 a
    # process checks the shard it holds (require_finite_weights sums the flags over processes).
    from pipeline.engines import local_values

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
