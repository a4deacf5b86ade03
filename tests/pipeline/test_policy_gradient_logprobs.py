"""Per-token log-probabilities, entropy and KL estimates of pipeline/policy_gradient.py on hand-made tensors:
at the sampling temperature, in float32, k1 and k3 on hand numbers."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from pipeline.policy_gradient import entropy_from_logits, kl_per_token, logprobs_of_tokens
from tests.pipeline.hand_made_tensors import tensor


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
