"""The PPO math of pipeline/rl/ as a whole: garbage in the padding reaches no reward, advantage,
loss, gradient or statistic. Each piece is tested on hand-made tensors beside it, one section of the module a
file: test_policy_gradient_masks.py, _logprobs.py, _advantages.py, _losses.py and _kl_controller.py; each
expected value there is worked out by hand (or by an explicit loop), so they check that the functions are PPO,
not merely that they run."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from pipeline.rl.advantages import gae_advantages, per_token_rewards
from pipeline.rl.kl import kl_per_token
from pipeline.rl.losses import clipped_policy_loss, clipped_value_loss
from pipeline.rl.masked import masked_mean, masked_whiten, response_mask
from tests.pipeline.rl.hand_made_tensors import EOS, NAN, poisoned


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
