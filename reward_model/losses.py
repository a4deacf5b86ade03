"""The reward model's training objective: the Bradley–Terry pairwise loss and its accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                  margin: torch.Tensor | float | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley–Terry: −log σ(r_chosen − r_rejected − margin), averaged over pairs (weighted by `weights`, which
    sum to 1, when given)."""
    difference = chosen_scores - rejected_scores
    if margin is not None:
        difference = difference - margin
    losses = -F.logsigmoid(difference)
    return losses.mean() if weights is None else (losses * weights).sum()


def pairwise_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> float:
    """Share of pairs where the chosen response scores strictly higher (NaN for no pairs)."""
    return (chosen_scores > rejected_scores).float().mean().item() if len(chosen_scores) else float("nan")
