"""PPO's clipped policy and value losses of pipeline/rl/losses.py on hand-computed cases, gradients
included, and micro-batch shares that add up to the minibatch's token mean whatever the split."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from pipeline.rl.losses import clipped_policy_loss, clipped_value_loss, minibatch_statistics
from tests.pipeline.rl.hand_made_tensors import NAN, poisoned, tensor


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
