"""Per-token rewards and GAE advantages of pipeline/rl/advantages.py against hand-computed batches and an
explicit loop: the score lands on the EOS, V after the last valid token is 0, padding stays 0."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from pipeline.rl.advantages import gae_advantages, per_token_rewards
from pipeline.rl.masked import response_mask
from tests.pipeline.rl.hand_made_tensors import EOS, NAN, PAD, poisoned, tensor


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
