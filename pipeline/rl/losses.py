"""PPO's clipped policy and value losses (Schulman et al. 2017) and the statistics logged beside them."""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.rl.masked import token_share


def clipped_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float,
                        log_ratio_clamp: float = 20.0, token_count: Tensor | int | None = None
                        ) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's pessimistic clipped surrogate as a token mean over `token_count` tokens (see `token_share`; pass the
    minibatch's count to a micro-batch); the log-ratio is clamped (±20 like OpenRLHF) so one wild token cannot
    overflow exp. The statistics are token shares too, so a minibatch's are the sums of its micro-batches' (see
    `minibatch_statistics`)."""
    mask = mask.bool()
    log_ratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))
    log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    advantages = torch.where(mask, advantages, torch.zeros_like(advantages))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = token_share(torch.max(unclipped, clipped), mask, token_count)
    with torch.no_grad():
        statistics = {"clipfrac": token_share((clipped > unclipped).float(), mask, token_count),
                      "approxkl": 0.5 * token_share(log_ratio ** 2, mask, token_count),
                      "ratio_mean": token_share(ratio, mask, token_count),
                      "ratio_square_mean": token_share(ratio ** 2, mask, token_count)}
    return loss, statistics


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float,
                       token_count: Tensor | int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """½·max((V − R)², (clip(V, V_old ± ε_v) − R)²) as a token mean over `token_count` tokens (see `token_share`):
    the critic may not jump far from the values the advantages were computed with."""
    mask = mask.bool()
    values = torch.where(mask, values, torch.zeros_like(values))
    old_values = torch.where(mask, old_values, torch.zeros_like(old_values))
    returns = torch.where(mask, returns, torch.zeros_like(returns))
    clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * token_share(torch.max(unclipped_loss, clipped_loss), mask, token_count)
    with torch.no_grad():
        statistics = {"vf_clipfrac": token_share((clipped_loss > unclipped_loss).float(), mask, token_count)}
    return loss, statistics


def minibatch_statistics(shares: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """A minibatch's token means from its micro-batches' token shares: their sums; the ratio's (population)
    variance E[r²] − E[r]² from the summed moments, since variances of micro-batches do not add up."""
    total = {key: torch.stack([share[key] for share in shares]).sum() for key in shares[0]}
    if "ratio_square_mean" in total:
        total["ratio_var"] = (total.pop("ratio_square_mean") - total["ratio_mean"] ** 2).clamp(min=0)
    return total
