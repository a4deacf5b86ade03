"""The math of PPO for language models, on batched tensors [batch, response_len] with a boolean `mask` that is
True on real response tokens (up to and including the first EOS). Padding never enters a mean or a statistic.

Sources: Schulman et al. 2017 (clipped objective), Schulman et al. 2016 (GAE), Ziegler et al. 2019 (KL penalty
and its adaptive coefficient), Huang et al. 2024 "The N+ Implementation Details of RLHF with PPO".
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean over valid positions; 0 where nothing is valid."""
    mask = mask.bool()
    # where, not values·mask: NaN·0 is NaN, so garbage in the padding would leak into the mean
    values = torch.where(mask, values, torch.zeros_like(values))
    # The count stays an integer: in bf16 a token count above 256 would be rounded
    count = mask.sum() if dim is None else mask.sum(dim)
    return (values.sum() if dim is None else values.sum(dim)) / count.clamp(min=1)


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum over valid positions; garbage (even NaN) in the padding is ignored."""
    mask = mask.bool()
    values = torch.where(mask, values, torch.zeros_like(values))
    return values.sum() if dim is None else values.sum(dim)


def token_share(values: Tensor, mask: Tensor, token_count: Tensor | int | None = None) -> Tensor:
    """Σ valid values / token_count: this batch's share of a token mean over `token_count` tokens (default its own
    count, i.e. its masked mean). Micro-batches of one minibatch, each given the minibatch's count, add up to the
    minibatch's token mean whatever the split; a mean per micro-batch would weigh a token of a short micro-batch
    more than one of a long micro-batch (the length bias described by Dr. GRPO, Liu et al. 2025)."""
    count = mask.bool().sum() if token_count is None else torch.as_tensor(token_count, device=values.device)
    return masked_sum(values, mask) / count.clamp(min=1)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over valid positions, Bessel-corrected by default."""
    mask = mask.bool()
    mean = masked_mean(values, mask)
    centred = torch.where(mask, values - mean, torch.zeros_like(values))
    count = mask.sum()
    variance = (centred ** 2).sum() / count.clamp(min=1)
    if unbiased:
        # Bessel's correction is undefined for one token; the biased 0 is returned then. torch.where, not an `if`
        # on the count, so that no GPU→CPU sync is forced.
        variance = torch.where(count > 1, variance * count / (count - 1).clamp(min=1), variance)
    return variance


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True,
                  sum_over_processes: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Normalise to unit variance (and zero mean) over valid tokens; padding comes back as 0.
    With one valid token or none the variance is undefined: values come back unchanged (N+ details, §whitening).
    `sum_over_processes` (an all-reduce sum) takes the mean and variance over the valid tokens of every process."""
    mask = mask.bool()
    if sum_over_processes is None:
        mean, variance, count = masked_mean(values, mask), masked_var(values, mask), mask.sum()
    else:
        # Two passes, as masked_var: the centred sum of squares is exact where E[x²] − E[x]² would cancel.
        total, count = sum_over_processes(torch.stack([masked_sum(values, mask), mask.sum().to(values.dtype)]))
        mean = total / count.clamp(min=1)
        squares = sum_over_processes(masked_sum((values - mean) ** 2, mask))
        variance = torch.where(count > 1, squares / (count - 1).clamp(min=1), squares / count.clamp(min=1))
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    whitened = torch.where(count > 1, whitened, values)
    return torch.where(mask, whitened, torch.zeros_like(values))


def response_mask(response_ids: Tensor, eos_token_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """(mask up to and including the first EOS, index of the last valid token, whether an EOS was found)."""
    is_eos = response_ids == eos_token_id
    contains_eos = is_eos.any(dim=1)
    length = response_ids.shape[1]
    # argmax returns the first maximal index, i.e. the first EOS
    first_eos = torch.where(contains_eos, is_eos.int().argmax(dim=1), length - 1)
    positions = torch.arange(length, device=response_ids.device)[None, :]
    return positions <= first_eos[:, None], first_eos, contains_eos
