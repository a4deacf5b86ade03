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


# On a CPU the vocabulary-wide work runs over blocks of rows of about this many bytes, which stay in the cache
# between the passes over them; one pass over all logits at once re-reads them from memory every time.
CPU_BLOCK_BYTES = 1 << 20


def row_blocks(rows: int, vocabulary: int, device: torch.device) -> list[slice]:
    """Slices of rows for vocabulary-wide work: cache-sized blocks on a CPU, all rows at once elsewhere (a GPU
    gains nothing from blocks and pays a kernel launch for each)."""
    size = rows if device.type != "cpu" else max(1, CPU_BLOCK_BYTES // (4 * vocabulary))
    return [slice(start, start + size) for start in range(0, rows, size)]


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits · inv_temperature)[token] with a backward of its own. Autograd's gather − logsumexp keeps
    several [batch, length, vocab] temporaries alive (the scaled copy, the logsumexp's shifted copy, the gather's
    zero-filled gradient, the logsumexp gradient's product); here the backward writes (onehot − softmax) · g into
    its one output, and on a CPU both passes run block by block in the cache (`row_blocks`). On a small model
    this vocabulary-wide elementwise work costs as much as the LM head's matmuls."""

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, inv_temperature: float) -> Tensor:
        flat, flat_tokens = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1, 1)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        log_normaliser = torch.empty(flat.shape[0], 1, dtype=dtype, device=logits.device)
        picked = torch.empty_like(log_normaliser)
        for rows in row_blocks(flat.shape[0], flat.shape[1], logits.device):
            scaled = flat[rows].to(dtype) * inv_temperature
            torch.logsumexp(scaled, dim=-1, keepdim=True, out=log_normaliser[rows])
            torch.gather(scaled, -1, flat_tokens[rows], out=picked[rows])
        ctx.save_for_backward(logits, tokens, log_normaliser)
        ctx.inv_temperature = inv_temperature
        return (picked - log_normaliser).view(tokens.shape)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        logits, tokens, log_normaliser = ctx.saved_tensors
        flat, flat_tokens = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1, 1)
        grad = grad_output.reshape(-1, 1).to(log_normaliser.dtype)
        grad_logits = torch.empty(flat.shape, dtype=log_normaliser.dtype, device=logits.device)
        for rows in row_blocks(flat.shape[0], flat.shape[1], logits.device):
            # d logprob / d scaled = onehot(token) − softmax(scaled); the scaling's chain rule multiplies by it.
            block = grad_logits[rows]
            block.copy_(flat[rows]).mul_(ctx.inv_temperature)  # in float32, as the forward scaled them
            block.sub_(log_normaliser[rows]).exp_().mul_(-grad[rows])
            block.scatter_add_(-1, flat_tokens[rows], grad[rows]).mul_(ctx.inv_temperature)
        return grad_logits.view(logits.shape).to(logits.dtype), None, None


def logprobs_of_tokens(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log π(token) at the sampling temperature, in float32 whatever the logits' dtype (bf16 log-softmax loses
    the small differences PPO's ratio is made of). TRL divides by temperature + 1e-7; so do we."""
    # Not trl.trainer.utils.selective_log_softmax (trl 1.16): for bf16 logits it takes the log-softmax in bf16.
    return _TokenLogprobs.apply(logits, tokens.long(), 1.0 / (temperature + 1e-7))


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-token entropy of the sampling distribution, in float32 (no gradient: it is a statistic)."""
    return logprobs_and_entropy(logits, None, temperature)[1]


@torch.no_grad()
def logprobs_and_entropy(logits: Tensor, tokens: Tensor | None, temperature: float = 1.0
                         ) -> tuple[Tensor | None, Tensor]:
    """(log π(token), entropy) per position in one blockwise pass over the logits, for the no-gradient scoring
    forward: H = log Z − Σ p·x, so no log-softmax of the whole batch is ever materialised. The logprobs are the
    same numbers `logprobs_of_tokens` computes, so PPO's first ratio is exactly 1."""
    flat = logits.reshape(-1, logits.shape[-1])
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_normaliser = torch.empty(flat.shape[0], 1, dtype=dtype, device=logits.device)
    picked, expected_logit = torch.empty_like(log_normaliser), torch.empty(flat.shape[0], dtype=dtype,
                                                                          device=logits.device)
    inv_temperature = 1.0 / (temperature + 1e-7)
    for rows in row_blocks(flat.shape[0], flat.shape[1], logits.device):
        scaled = flat[rows].to(dtype) * inv_temperature
        torch.logsumexp(scaled, dim=-1, keepdim=True, out=log_normaliser[rows])
        if tokens is not None:
            torch.gather(scaled, -1, tokens.reshape(-1, 1)[rows].long(), out=picked[rows])
        # A token masked to −inf has p·x = 0·(−inf) = NaN; a finite floor makes its term 0 (its p is still 0).
        floored = scaled.clamp(min=torch.finfo(dtype).min)
        expected_logit[rows] = scaled.sub_(log_normaliser[rows]).exp_().mul_(floored).sum(-1)
    shape = logits.shape[:-1]
    logprobs = None if tokens is None else (picked - log_normaliser).view(shape)
    return logprobs, (log_normaliser.squeeze(-1) - expected_logit).view(shape)


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from samples of π. k1 = log π − log π_ref (unbiased, can be negative);
    k3 = (r − 1) − log r with r = π_ref/π (never negative, lower variance; biased as a reward: trl#4967)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        # expm1 keeps r − 1 exact near r = 1; the clamp guards the last ulp of rounding, so k3 is never negative
        return (torch.expm1(-log_ratio) + log_ratio).clamp(min=0)
    raise ValueError(f"kl_estimator: unknown estimator {estimator!r}; use 'k1' or 'k3'")


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


class FixedKLController:
    """β that stays where it was set."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019: move β proportionally to how far the measured KL is from a target, at most ±20% of
    the way per horizon."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL controller: target ({target}) and horizon ({horizon}) must be positive")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        # float(): a tensor KL would turn β into a tensor, and the checkpointed state would no longer be JSON
        proportional_error = max(-0.2, min(0.2, float(current_kl) / self.target - 1))
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        # A state saved by a FixedKLController holds only β: keep this controller's target and horizon.
        self.value = float(state["value"])
        self.target, self.horizon = float(state.get("target", self.target)), float(state.get("horizon", self.horizon))


def kl_controller_from_config(kl_coef: float, target_kl: float | None,
                              horizon: int) -> FixedKLController | AdaptiveKLController:
    """A fixed β, or Ziegler et al.'s adaptive β when a target KL is given."""
    if target_kl is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target_kl, horizon)
