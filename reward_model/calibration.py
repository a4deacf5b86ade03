"""How well the reward model's preference probabilities match how often it is right."""

from __future__ import annotations

import torch


def preference_calibration(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                           chosen_preferred: torch.Tensor | None = None, bins: int = 10) -> dict:
    """How well the Bradley–Terry probability σ(r_chosen − r_rejected) matches how often the chosen response is
    in fact preferred (`chosen_preferred`, bools; all true, i.e. the labels themselves, when None).

    Returns {"expected_calibration_error", "bins"}: the bins split [0, 1] into `bins` equal widths, each with
    its count, mean predicted probability and observed frequency (None when empty); the error is the
    count-weighted mean gap between the two. Every pair counts in both orders, (p, y) and (1 − p, 1 − y):
    a pair has no natural first response, and with labelled data listing the chosen one first every observed
    frequency would otherwise be 1. The diagram is then symmetric about (0.5, 0.5)."""
    if len(chosen_scores) != len(rejected_scores):
        raise ValueError(f"preference_calibration: {len(chosen_scores)} chosen but {len(rejected_scores)} rejected scores")
    if bins < 1:
        raise ValueError(f"preference_calibration: bins must be positive, got {bins}")
    predicted = torch.sigmoid((chosen_scores - rejected_scores).double())
    observed = torch.ones_like(predicted) if chosen_preferred is None else chosen_preferred.double()
    predicted, observed = torch.cat([predicted, 1 - predicted]), torch.cat([observed, 1 - observed])
    index = (predicted * bins).long().clamp(max=bins - 1)
    table, error = [], 0.0
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        mean_predicted = predicted[members].mean().item() if count else None
        frequency = observed[members].mean().item() if count else None
        if count:
            error += count / len(predicted) * abs(mean_predicted - frequency)
        table.append({"low": b / bins, "high": (b + 1) / bins, "count": count,
                      "mean_predicted": mean_predicted, "observed": frequency})
    return {"expected_calibration_error": error if len(predicted) else float("nan"), "bins": table}
