"""Fault injection for the reliability tests: `RLHF_INJECT_NAN=<stage>:<step>` poisons a weight with NaN just
before that optimizer step, so the loss really turns NaN and the stage's guards are exercised end to end."""

from __future__ import annotations

import os

import torch

NAN_VARIABLE = "RLHF_INJECT_NAN"


def poison_weights_if_requested(stage: str, step: int, model: torch.nn.Module) -> None:
    """Fill the first trainable parameter with NaN when the environment asks for it at this stage and step."""
    request = os.environ.get(NAN_VARIABLE)
    if request != f"{stage}:{step}":
        return
    parameter = next(p for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        parameter.fill_(float("nan"))


def weights_are_finite(model: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())
