"""Per-token rewards (score at the last token, KL penalty everywhere) and generalised advantage estimates.

Sources: Ziegler et al. 2019 (KL-penalised reward), Schulman et al. 2016 (GAE), Huang et al. 2024."""

from __future__ import annotations

import torch
from torch import Tensor


def per_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, last_index: Tensor,
                      kl_coef: float) -> tuple[Tensor, Tensor]:
    """(−β·KL on every valid token with the score added at the last valid token — the EOS, where the reward
    model read it, as in lm-human-preferences and OpenRLHF, not one past it; the KL part alone)."""
    mask = mask.bool()
    non_score = torch.where(mask, -kl_coef * kl, torch.zeros_like(kl))
    rewards = non_score.clone()
    rows = torch.arange(len(scores), device=scores.device)
    # A row with no valid token has nowhere to put its score: padding must stay 0.
    at_end = torch.where(mask[rows, last_index], scores.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))
    rewards[rows, last_index] += at_end
    return rewards, non_score


def gae_advantages(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation backwards over response tokens; V after the last valid token is 0.
    δ_t = r_t + γ·V_{t+1} − V_t, A_t = δ_t + γλ·A_{t+1}; returns = A + V. Zero on padding."""
    mask = mask.bool()
    rewards = torch.where(mask, rewards, torch.zeros_like(rewards))
    values = torch.where(mask, values, torch.zeros_like(values))
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        running = torch.where(mask[:, t], running, torch.zeros_like(running))
        advantages[:, t] = running
        next_value = values[:, t]
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns
