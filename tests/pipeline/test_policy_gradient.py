"""The PPO math on hand-made tensors: each expected value is worked out by hand (or by an explicit loop written
here), so these tests check that the functions are PPO, not merely that they run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from pipeline.policy_gradient import (
    AdaptiveKLController, FixedKLController, clipped_policy_loss, clipped_value_loss, entropy_from_logits,
    gae_advantages, kl_controller_from_config, kl_per_token, logprobs_of_tokens, masked_mean, masked_sum, masked_var,
    masked_whiten, minibatch_statistics, per_token_rewards, response_mask, token_share)

EOS, PAD = 2, 0
NAN = float("nan")


def tensor(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def poisoned(values: torch.Tensor, mask: torch.Tensor, garbage: float) -> torch.Tensor:
    """`values` with every padding position replaced by garbage (NaN, 1e9, ...)."""
    return values.masked_fill(~mask, garbage)


# ---------------------------------------------------------------- masks after EOS
def test_response_mask_with_eos_first_middle_last_and_absent():
    responses = torch.tensor([[EOS, 5, 6, 7],     # first
                              [5, 6, EOS, 7],     # middle, and a token after it
                              [5, 6, 7, EOS],     # last
                              [5, 6, 7, 8],       # absent: all valid, last index T-1
                              [5, EOS, EOS, 9]])  # two EOS: the first one ends the response
    mask, last_index, contains_eos = response_mask(responses, EOS)
    assert mask.dtype == torch.bool and last_index.dtype == torch.long and contains_eos.dtype == torch.bool
    assert mask.tolist() == [[True, False, False, False],
                             [True, True, True, False],
                             [True, True, True, True],
                             [True, True, True, True],
                             [True, True, False, False]]
    assert last_index.tolist() == [0, 2, 3, 3, 1]
    assert contains_eos.tolist() == [True, True, True, False, True]


# ---------------------------------------------------------------- masked statistics
def test_masked_mean_and_var_ignore_padding_even_nan():
    values = tensor([[1.0, 2.0, NAN], [4.0, 1e9, float("inf")]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert_close(masked_mean(values, mask), torch.tensor(7.0 / 3))
    assert_close(masked_mean(values, mask, dim=1), tensor([1.5, 4.0]))
    assert_close(masked_var(values, mask), torch.var(tensor([1.0, 2.0, 4.0])))
    assert_close(masked_var(values, mask, unbiased=False), torch.var(tensor([1.0, 2.0, 4.0]), correction=0))


def test_masked_statistics_of_empty_rows_and_empty_batches_are_zero_not_nan():
    values = tensor([[1.0, 3.0], [NAN, NAN]])
    mask = torch.tensor([[True, True], [False, False]])
    assert_close(masked_mean(values, mask, dim=1), tensor([2.0, 0.0]))
    nothing = torch.zeros_like(mask)
    assert masked_mean(values, nothing).item() == 0.0
    assert masked_var(values, nothing).item() == 0.0
    assert masked_var(tensor([[5.0, NAN]]), torch.tensor([[True, False]])).item() == 0.0  # one token


def test_whitening_gives_zero_mean_unit_variance_over_valid_tokens_and_zero_padding():
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    values = poisoned(tensor([[1.0, 2.0, 3.0, 0.0], [10.0, -4.0, 0.0, 0.0]]), mask, NAN)
    whitened = masked_whiten(values, mask)
    assert torch.isfinite(whitened).all()
    assert (whitened[~mask] == 0).all()
    assert_close(masked_mean(whitened, mask), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(masked_var(whitened, mask), torch.tensor(1.0), atol=1e-5, rtol=0)
    valid = values[mask]
    assert_close(whitened[mask], (valid - valid.mean()) / valid.std())


def test_whitening_without_shifting_the_mean_keeps_it():
    mask = torch.tensor([[True, True, True, False]])
    values = poisoned(tensor([[1.0, 2.0, 6.0, 0.0]]), mask, 1e9)
    whitened = masked_whiten(values, mask, shift_mean=False)
    assert_close(masked_mean(whitened, mask), torch.tensor(3.0))
    assert_close(masked_var(whitened, mask), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert whitened[0, 3].item() == 0.0


def test_whitening_one_valid_token_or_none_returns_values_unchanged():
    one = torch.tensor([[False, True, False], [False, False, False]])
    values = tensor([[NAN, 7.5, 1e9], [NAN, NAN, NAN]])
    assert masked_whiten(values, one).tolist() == [[0.0, 7.5, 0.0], [0.0, 0.0, 0.0]]
    assert masked_whiten(values, one, shift_mean=False).tolist() == [[0.0, 7.5, 0.0], [0.0, 0.0, 0.0]]
    assert masked_whiten(values, torch.zeros_like(one)).eq(0).all()


# ---------------------------------------------------------------- logprobs and entropy
def test_logprobs_of_tokens_equals_gathered_log_softmax_at_the_temperature():
    torch.manual_seed(0)
    logits, tokens = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
    for temperature in (1.0, 0.7):
        expected = torch.log_softmax(logits / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)
        assert_close(logprobs_of_tokens(logits, tokens, temperature), expected)
    # The temperature is really applied: a colder distribution gives different logprobs.
    assert not torch.allclose(logprobs_of_tokens(logits, tokens, 0.7), logprobs_of_tokens(logits, tokens))


def test_logprobs_of_bf16_logits_are_float32_and_close_to_the_fp32_result():
    torch.manual_seed(0)
    logits, tokens = 4 * torch.randn(2, 5, 50), torch.randint(0, 50, (2, 5))
    low = logits.bfloat16()
    logprobs = logprobs_of_tokens(low, tokens)
    assert logprobs.dtype == torch.float32
    # Exact log-softmax of the bf16 values (the computation itself ran in fp32) ...
    assert_close(logprobs, torch.log_softmax(low.float(), -1).gather(-1, tokens[..., None]).squeeze(-1))
    # ... and close to the fp32 logits' result up to the rounding of the logits themselves.
    assert_close(logprobs, logprobs_of_tokens(logits, tokens), atol=0.1, rtol=0)


def test_logprobs_carry_gradients_to_the_logits():
    logits = torch.randn(1, 2, 5, requires_grad=True)
    logprobs_of_tokens(logits, torch.tensor([[1, 3]])).sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_entropy_of_uniform_logits_is_log_vocabulary_size():
    entropy = entropy_from_logits(torch.zeros(2, 3, 17, dtype=torch.bfloat16), temperature=0.5)
    assert entropy.dtype == torch.float32 and entropy.shape == (2, 3)
    assert_close(entropy, torch.full((2, 3), math.log(17)))
    # A one-hot-like distribution has (almost) no entropy; a temperature above 1 raises it.
    peaked = torch.tensor([[[50.0, 0.0, 0.0]]])
    assert entropy_from_logits(peaked).item() < 1e-6
    assert entropy_from_logits(peaked, temperature=100.0).item() > entropy_from_logits(peaked).item()
    # Tokens masked to −inf count as probability 0, not as NaN.
    assert_close(entropy_from_logits(torch.tensor([[[0.0, 0.0, -math.inf]]])), torch.tensor([[math.log(2)]]))


# ---------------------------------------------------------------- KL estimators
def test_kl_estimators_on_hand_numbers():
    logprobs, ref_logprobs = tensor([[-1.0, -2.0, -0.5]]), tensor([[-1.5, -1.0, -0.5]])
    # k1 = logπ − logπ_ref
    assert_close(kl_per_token(logprobs, ref_logprobs, "k1"), tensor([[0.5, -1.0, 0.0]]))
    assert_close(kl_per_token(logprobs, ref_logprobs), tensor([[0.5, -1.0, 0.0]]))  # k1 is the default
    # k3 = (r − 1) − log r, r = exp(ref − logπ): r = e^-0.5 and e^1
    expected = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 0.0]
    assert_close(kl_per_token(logprobs, ref_logprobs, "k3"), tensor([expected]))


def test_k3_is_never_negative_and_both_estimators_vanish_when_the_policies_agree():
    torch.manual_seed(0)
    logprobs = torch.randn(64, 32) * torch.logspace(-8, 1, 32)
    ref_logprobs = logprobs + torch.randn(64, 32) * torch.logspace(-8, 1, 32)
    assert (kl_per_token(logprobs, ref_logprobs, "k3") >= 0).all()
    assert (kl_per_token(logprobs, ref_logprobs, "k1") < 0).any()  # k1 can be negative on single samples
    for estimator in ("k1", "k3"):
        assert kl_per_token(logprobs, logprobs.clone(), estimator).eq(0).all()


def test_unknown_kl_estimator_raises_naming_it():
    with pytest.raises(ValueError, match="'k2'"):
        kl_per_token(torch.zeros(1, 2), torch.zeros(1, 2), "k2")


# ---------------------------------------------------------------- rewards
def test_score_lands_exactly_on_the_eos_token_not_one_past_it():
    responses = torch.tensor([[5, EOS, PAD, PAD], [5, 6, 7, 8], [EOS, PAD, PAD, PAD]])
    mask, last_index, _ = response_mask(responses, EOS)
    kl = poisoned(tensor([[0.2, 0.4, 0.0, 0.0], [0.1, -0.1, 0.3, 0.5], [1.0, 0.0, 0.0, 0.0]]), mask, NAN)
    rewards, non_score = per_token_rewards(tensor([3.0, -1.0, 2.0]), kl, mask, last_index, kl_coef=0.5)
    assert_close(non_score, tensor([[-0.1, -0.2, 0, 0], [-0.05, 0.05, -0.15, -0.25], [-0.5, 0, 0, 0]]))
    assert_close(rewards, tensor([[-0.1, 2.8, 0, 0], [-0.05, 0.05, -0.15, -1.25], [1.5, 0, 0, 0]]))


def test_per_token_rewards_keep_padding_zero_for_a_row_without_valid_tokens():
    mask = torch.tensor([[True, True], [False, False]])
    rewards, non_score = per_token_rewards(tensor([1.0, 5.0]), tensor([[0.0, 0.0], [NAN, NAN]]), mask,
                                           torch.tensor([1, 1]), kl_coef=0.1)
    assert rewards.tolist() == [[0.0, 1.0], [0.0, 0.0]]
    assert non_score.eq(0).all()


# ---------------------------------------------------------------- GAE
def test_gae_against_a_hand_computed_batch_with_one_row_ending_early():
    gamma, lam = 0.9, 0.8
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    rewards = tensor([[0.1, -0.2, 0.0, 1.0], [0.3, 2.0, 1e9, NAN]])
    values = tensor([[0.5, 0.4, 0.3, 0.2], [0.6, -0.1, NAN, 1e9]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma, lam)

    # By hand, γλ = 0.72; row 0:
    #   t=3: δ = 1.0 + 0.9·0   − 0.2 =  0.8    A =  0.8
    #   t=2: δ = 0.0 + 0.9·0.2 − 0.3 = −0.12   A = −0.12 + 0.72·0.8      =  0.456
    #   t=1: δ = −0.2 + 0.9·0.3 − 0.4 = −0.33  A = −0.33 + 0.72·0.456    = −0.00168
    #   t=0: δ = 0.1 + 0.9·0.4 − 0.5 = −0.04   A = −0.04 + 0.72·(−0.00168) = −0.0412096
    # row 1 ends at t=1, so V after it is 0 and the garbage in the padding is never read:
    #   t=1: δ = 2.0 + 0.9·0 + 0.1 = 2.1       A = 2.1
    #   t=0: δ = 0.3 − 0.09 − 0.6 = −0.39      A = −0.39 + 0.72·2.1 = 1.122
    expected_advantages = tensor([[-0.0412096, -0.00168, 0.456, 0.8], [1.122, 2.1, 0.0, 0.0]])
    expected_returns = tensor([[0.4587904, 0.39832, 0.756, 1.0], [1.722, 2.0, 0.0, 0.0]])
    assert_close(advantages, expected_advantages)
    assert_close(returns, expected_returns)


def reference_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """Schulman et al. 2016, one unpadded row at a time, as an explicit loop."""
    advantages, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
        advantages[t] = running
    return advantages


def test_gae_matches_an_explicit_loop_on_random_ragged_rows():
    torch.manual_seed(0)
    lengths = [5, 1, 3, 0]
    mask = torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]
    rewards, values = torch.randn(4, 5), torch.randn(4, 5)
    advantages, returns = gae_advantages(poisoned(rewards, mask, NAN), poisoned(values, mask, 1e9), mask, 0.95, 0.9)
    for row, length in enumerate(lengths):
        expected = reference_gae(rewards[row, :length].tolist(), values[row, :length].tolist(), 0.95, 0.9)
        assert_close(advantages[row, :length], torch.tensor(expected))
        assert_close(returns[row, :length], torch.tensor(expected) + values[row, :length])
        assert advantages[row, length:].eq(0).all() and returns[row, length:].eq(0).all()


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    rewards = tensor([[1.0, 0.0, -2.0, 4.0], [0.5, 0.5, 3.0, 1e9]])
    values = tensor([[0.3, 1.0, -1.0, 2.0], [1.0, 2.0, 0.0, NAN]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    reward_to_go = tensor([[3.0, 2.0, 2.0, 4.0], [4.0, 3.5, 3.0, 0.0]])
    assert_close(returns, reward_to_go)
    assert_close(advantages, (reward_to_go - values.nan_to_num()) * mask)


# ---------------------------------------------------------------- clipped policy loss
def test_policy_loss_at_ratio_one_is_minus_the_mean_advantage_with_no_clipping():
    mask = torch.tensor([[True, True, True], [True, False, False]])
    logprobs = poisoned(tensor([[-1.0, -2.0, -0.3], [-0.7, 0.0, 0.0]]), mask, NAN)
    advantages = poisoned(tensor([[1.0, -3.0, 0.5], [2.5, 0.0, 0.0]]), mask, 1e9)
    loss, stats = clipped_policy_loss(logprobs, logprobs.clone(), advantages, mask, clip_range=0.2)
    assert_close(loss, torch.tensor(-(1.0 - 3.0 + 0.5 + 2.5) / 4))
    assert stats["clipfrac"].item() == 0.0 and stats["approxkl"].item() == 0.0
    assert stats["ratio_mean"].item() == 1.0 and minibatch_statistics([stats])["ratio_var"].item() == 0.0


def test_policy_loss_on_a_hand_computed_case_clips_only_where_ppo_should():
    # ε = 0.2; tokens: (ratio, A) = (1.5, +2) clipped, (0.5, −1) clipped, (1.1, +1) inside the range,
    # (0.5, +1) below the range but not clipped (the min of the surrogate keeps the unclipped, worse term),
    # then padding full of NaN.
    ratios = [1.5, 0.5, 1.1, 0.5]
    mask = torch.tensor([[True, True, True, True, False]])
    old_logprobs = tensor([[-1.0, -2.0, -0.5, -3.0, NAN]])
    new = (old_logprobs[:, :4] + torch.log(tensor([ratios]))).detach()
    logprobs = torch.cat([new, tensor([[NAN]])], dim=1).requires_grad_()
    advantages = tensor([[2.0, -1.0, 1.0, 1.0, 1e9]])
    loss, stats = clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=0.2)

    # max(−A·ratio, −A·clip(ratio)) per token: max(−3, −2.4), max(0.5, 0.8), max(−1.1, −1.1), max(−0.5, −0.8)
    assert_close(loss, torch.tensor((-2.4 + 0.8 - 1.1 - 0.5) / 4))
    assert_close(stats["clipfrac"], torch.tensor(0.5))
    log_ratios = [math.log(r) for r in ratios]
    assert_close(stats["approxkl"], torch.tensor(0.5 * sum(x * x for x in log_ratios) / 4))
    assert_close(stats["ratio_mean"], torch.tensor(0.9))
    assert_close(stats["ratio_square_mean"], torch.tensor((2.25 + 0.25 + 1.21 + 0.25) / 4))
    assert all(not value.requires_grad and value.dim() == 0 for value in stats.values())
    # population variance over the 4 tokens, from the moments
    assert_close(minibatch_statistics([stats])["ratio_var"], torch.tensor((0.36 + 0.16 + 0.04 + 0.16) / 4))

    loss.backward()
    # d/dlogπ of −A·ratio is −A·ratio; clipped tokens and padding get no gradient at all.
    assert_close(logprobs.grad, tensor([[0.0, 0.0, -1.1 / 4, -0.5 / 4, 0.0]]))


def test_policy_loss_clips_a_large_ratio_with_positive_advantage_and_a_small_one_with_negative_advantage():
    mask = torch.tensor([[True]])
    for ratio, advantage in ((2.0, 1.0), (0.3, -1.0)):
        logprobs = torch.tensor([[math.log(ratio)]], requires_grad=True)
        loss, stats = clipped_policy_loss(logprobs, torch.zeros(1, 1), tensor([[advantage]]), mask, 0.2)
        loss.backward()
        assert logprobs.grad.item() == 0.0
        assert stats["clipfrac"].item() == 1.0
        assert_close(loss, torch.tensor(-advantage * (1.2 if ratio > 1 else 0.8)))


def test_policy_loss_log_ratio_is_clamped_so_nothing_overflows():
    logprobs = torch.tensor([[0.0, 0.0]], requires_grad=True)
    old_logprobs = tensor([[-500.0, 500.0]])
    loss, stats = clipped_policy_loss(logprobs, old_logprobs, tensor([[-1.0, 1.0]]), torch.tensor([[True, True]]), 0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logprobs.grad).all()
    assert all(torch.isfinite(value) for value in stats.values())
    assert_close(stats["ratio_mean"], torch.tensor((math.exp(20) + math.exp(-20)) / 2))


def test_masked_sum_and_token_share_by_hand():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    values = poisoned(tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]]), mask, NAN)
    assert masked_sum(values, mask).item() == 7.0
    assert masked_sum(values, mask, dim=1).tolist() == [3.0, 4.0]
    assert_close(token_share(values, mask), torch.tensor(7.0 / 3))  # its own count: the masked mean
    assert_close(token_share(values, mask, token_count=10), torch.tensor(0.7))
    assert_close(token_share(values, mask, token_count=torch.tensor(10)), torch.tensor(0.7))
    assert token_share(values, torch.zeros_like(mask), token_count=0).item() == 0.0  # no token: 0, not NaN


def test_micro_batch_shares_add_up_to_the_minibatch_token_mean_whatever_the_split():
    # A long row (4 tokens) and a short one (1 token). As one batch every token weighs 1/5. Split into two
    # micro-batches that each take their own mean, the short row's token would weigh 1/2 (times 1/2 for the
    # accumulation) = 1/4 and each long-row token 1/8: the length bias. Normalised by the minibatch's 5 tokens,
    # the split changes nothing, for the losses, their gradients and the statistics.
    mask = torch.tensor([[True, True, True, True], [True, False, False, False]])
    old_logprobs = tensor([[-1.0, -2.0, -0.5, -3.0], [-1.5, NAN, NAN, NAN]])
    ratios = tensor([[1.5, 0.5, 1.1, 0.9], [1.3, 1.0, 1.0, 1.0]])
    advantages = tensor([[2.0, -1.0, 1.0, -0.5], [1.0, 1e9, 1e9, 1e9]])
    old_values = tensor([[0.5, 0.5, 0.4, 0.1], [0.2, 0.0, 0.0, 0.0]])
    returns = tensor([[0.0, 2.0, 0.35, 0.3], [1.0, 0.0, 0.0, 0.0]])

    def losses(rows, token_count):
        logprobs = (old_logprobs[rows] + torch.log(ratios[rows])).detach().requires_grad_()
        values = tensor([[1.0, 1.0, 0.3, 0.2], [0.1, 0, 0, 0]])[rows].requires_grad_()
        policy_loss, policy_stats = clipped_policy_loss(logprobs, old_logprobs[rows], advantages[rows], mask[rows], 0.2,
                                                        token_count=token_count)
        value_loss, value_stats = clipped_value_loss(values, old_values[rows], returns[rows], mask[rows], 0.2,
                                                     token_count=token_count)
        (policy_loss + value_loss).backward()
        return policy_loss, value_loss, logprobs.grad, values.grad, {**policy_stats, **value_stats}

    whole_policy, whole_value, policy_grad, value_grad, whole_stats = losses([0, 1], None)
    # by hand, max(−A·r, −A·clip(r, 0.8, 1.2)) per token: −2.4 (clipped), 0.8 (clipped), −1.1, 0.45; −1.2 (clipped)
    assert_close(whole_policy, torch.tensor((-2.4 + 0.8 - 1.1 + 0.45 - 1.2) / 5))
    long, short = losses([0], 5), losses([1], 5)
    assert_close(long[0] + short[0], whole_policy)
    assert_close(long[1] + short[1], whole_value)
    assert_close(torch.cat([long[2], short[2]]), policy_grad)
    assert_close(torch.cat([long[3], short[3]]), value_grad)
    assert short[2][0, 0].item() == 0.0  # clipped: no gradient
    assert_close(long[2][0, 2], torch.tensor(-1.0 * 1.1 / 5))  # the weight is 1/5, not 1/4 of the long row

    combined, alone = minibatch_statistics([long[4], short[4]]), minibatch_statistics([whole_stats])
    assert combined.keys() == alone.keys() == {"clipfrac", "approxkl", "ratio_mean", "ratio_var", "vf_clipfrac"}
    for key in combined:
        assert_close(combined[key], alone[key], msg=key)
    assert_close(combined["ratio_mean"], torch.tensor((1.5 + 0.5 + 1.1 + 0.9 + 1.3) / 5))
    assert_close(combined["ratio_var"], torch.tensor((0.44 ** 2 + 0.56 ** 2 + 0.04 ** 2 + 0.16 ** 2 + 0.24 ** 2) / 5))
    assert_close(combined["clipfrac"], torch.tensor(3 / 5))
    # The mean per micro-batch, as before: the short row's token counts four times one of the long row.
    biased_policy = (losses([0], None)[0] + losses([1], None)[0]) / 2
    assert not torch.allclose(biased_policy, whole_policy)


# ---------------------------------------------------------------- clipped value loss
def test_value_loss_with_and_without_clipping_by_hand():
    mask = torch.tensor([[True, True, True, False]])
    values = tensor([[1.0, 1.0, 0.3, NAN]]).requires_grad_()
    old_values = tensor([[0.5, 0.5, 0.4, 1e9]])
    returns = tensor([[0.0, 2.0, 0.35, NAN]])
    loss, stats = clipped_value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    # token 0: V clipped to 0.7 → max(1.0², 0.7²) = 1.0 (unclipped chosen)
    # token 1: V clipped to 0.7 → max(1.0², 1.3²) = 1.69 (clipped chosen)
    # token 2: inside the range → 0.05² either way
    assert_close(loss, torch.tensor(0.5 * (1.0 + 1.69 + 0.0025) / 3))
    assert_close(stats["vf_clipfrac"], torch.tensor(1 / 3))
    loss.backward()
    # The clipped term is flat in V: token 1 gets no gradient; token 0 gets (V − R)/3, token 2 (V − R)/3.
    assert_close(values.grad, tensor([[1.0 / 3, 0.0, -0.05 / 3, 0.0]]))

    unclipped, stats = clipped_value_loss(values, old_values, returns, mask, clip_range_value=10.0)
    assert_close(unclipped, torch.tensor(0.5 * (1.0 + 1.0 + 0.0025) / 3))
    assert stats["vf_clipfrac"].item() == 0.0


# ---------------------------------------------------------------- padding never leaks
def test_garbage_in_padding_changes_no_loss_statistic_or_advantage():
    torch.manual_seed(0)
    responses = torch.tensor([[5, 6, EOS, 7, 8], [EOS, 9, 9, 9, 9], [5, 6, 7, 8, 9]])
    mask, last_index, _ = response_mask(responses, EOS)
    empty = torch.zeros(1, 5, dtype=torch.bool)  # and a row with no valid token at all
    mask, last_index = torch.cat([mask, empty]), torch.cat([last_index, torch.tensor([4])])
    logprobs, old_logprobs, ref_logprobs = -torch.rand(4, 5), -torch.rand(4, 5), -torch.rand(4, 5)
    values, old_values, scores = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4)

    def everything(logprobs, old_logprobs, ref_logprobs, values, old_values, garbage):
        kl = kl_per_token(logprobs, ref_logprobs)
        rewards, non_score = per_token_rewards(scores, kl, mask, last_index, 0.05)
        advantages, returns = gae_advantages(rewards, values, mask, 1.0, 0.95)
        whitened = masked_whiten(advantages, mask)
        # The losses see the garbage directly too (advantages and returns as a buggy caller might pad them), and
        # their gradients must not turn NaN on padding: 0·NaN is NaN in a backward pass.
        new_logprobs, new_values = logprobs.clone().requires_grad_(), values.clone().requires_grad_()
        junk = torch.zeros_like(logprobs).masked_fill(~mask, garbage)
        policy_loss, policy_stats = clipped_policy_loss(new_logprobs, old_logprobs, whitened + junk, mask, 0.2)
        value_loss, value_stats = clipped_value_loss(new_values, old_values, returns + junk, mask, 0.2)
        (policy_loss + value_loss).backward()
        return {"rewards": rewards, "non_score": non_score, "advantages": advantages, "returns": returns,
                "whitened": whitened, "policy_loss": policy_loss, "value_loss": value_loss,
                "policy_grad": new_logprobs.grad, "value_grad": new_values.grad,
                "kl_mean": masked_mean(kl, mask), "k3_mean": masked_mean(kl_per_token(logprobs, ref_logprobs, "k3"),
                                                                         mask),
                "row_means": masked_mean(values, mask, dim=1), **policy_stats, **value_stats}

    inputs = (logprobs, old_logprobs, ref_logprobs, values, old_values)
    clean = everything(*(t.masked_fill(~mask, 0.0) for t in inputs), 0.0)
    runs = {garbage: everything(*(poisoned(t, mask, garbage) for t in inputs), garbage)
            for garbage in (NAN, 1e9, -1e9, float("inf"))}
    # As a model gives them: finite logprobs and values on padding, new ≠ old there, with NaN advantages.
    runs["model outputs"] = everything(*inputs, NAN)
    for garbage, dirty in runs.items():
        for name, value in dirty.items():
            assert torch.isfinite(value).all(), (name, garbage)
            assert_close(value, clean[name], msg=f"{name} with {garbage} in the padding")
    assert clean["advantages"][3].eq(0).all() and clean["rewards"][3].eq(0).all()
    assert clean["policy_grad"][~mask].eq(0).all() and clean["value_grad"][~mask].eq(0).all()


# ---------------------------------------------------------------- KL controllers
def test_adaptive_kl_controller_moves_beta_towards_the_target_within_the_clip():
    def after(current_kl: float) -> float:
        controller = AdaptiveKLController(0.1, target=6.0, horizon=1000)
        controller.update(current_kl, n_steps=100)
        return controller.value

    assert_close(after(6.6), 0.1 * (1 + 0.1 * 100 / 1000))  # 10% above target: β up 1%
    assert_close(after(5.4), 0.1 * (1 - 0.1 * 100 / 1000))  # 10% below target: β down 1%
    assert_close(after(60.0), 0.1 * (1 + 0.2 * 100 / 1000))  # far above: the error is clipped at +20%
    assert_close(after(0.0), 0.1 * (1 - 0.2 * 100 / 1000))  # far below: clipped at −20%
    assert after(6.0) == 0.1

    controller = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    for _ in range(10):
        controller.update(12.0, n_steps=100)
    assert_close(controller.value, 0.1 * 1.02 ** 10)


def test_kl_controller_state_round_trips_through_json():
    controller = AdaptiveKLController(0.05, target=4.0, horizon=500)
    controller.update(torch.tensor(5.0), n_steps=64)  # a tensor KL must not turn β into a tensor
    state = json.loads(json.dumps(controller.state_dict()))
    assert state == {"value": controller.value, "target": 4.0, "horizon": 500.0}
    restored = AdaptiveKLController(1.0, target=1.0, horizon=1)
    restored.load_state_dict(state)
    assert restored.state_dict() == controller.state_dict()
    restored.update(3.0, 64), controller.update(3.0, 64)
    assert restored.value == controller.value

    fixed = FixedKLController(0.05)
    fixed.update(100.0, n_steps=1000)
    assert fixed.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(json.loads(json.dumps(fixed.state_dict())))
    assert other.value == 0.05


def test_kl_controller_from_config_picks_fixed_or_adaptive():
    fixed = kl_controller_from_config(0.05, None, 10000)
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.05
    adaptive = kl_controller_from_config(0.2, 6.0, 10000)
    assert isinstance(adaptive, AdaptiveKLController)
    assert adaptive.state_dict() == {"value": 0.2, "target": 6.0, "horizon": 10000.0}
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
