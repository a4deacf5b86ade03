"""Fault injection for the reliability tests, at the fault points of the training loops
(pipeline/train/guards.py `fault_point`), loaded into every stage process by RLHF_FAULT_HOOKS=tests.faults.injection
(tests/conftest.py sets it for the whole suite).

`RLHF_INJECT_NAN=<stage>:<step>` poisons a weight with NaN just before that step's update, so the loss really
turns NaN; `RLHF_INJECT_NAN_GRADIENT=<stage>:<step>` poisons a gradient after that step's backward passes, so
the loss stays finite and only the gradient norm shows it: the case a loss check alone lets through to the next
checkpoint. `RLHF_HALT_AT=<stage>:<step>` stops every process of the stage dead (a wait, nothing more) at the
start of that step, after touching the file RLHF_HALT_FILE names: a test then kills the whole run with SIGKILL at
a known point, also where the stage's processes live in sessions of their own (torchrun's). Steps are counted from
0, as the loops count them before the optimizer step.
"""

from __future__ import annotations

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


def inject(point: str, stage: str, step: int, model: torch.nn.Module | None) -> None:
    """The fault the environment asks for at this fault point, if any."""
    if point == "step":
        halt_if_requested(stage, step)
    elif point == "update":
        poison_weights_if_requested(stage, step, model)
    elif point == "gradients":
        poison_gradients_if_requested(stage, step, model)
    else:
        raise ValueError(f"unknown fault point {point!r}")
