"""Per-token log-probabilities, entropy and KL estimates of pipeline/rl/logprobs.py and pipeline/rl/kl.py on hand-made tensors:
at the sampling temperature, in float32, k1 and k3 on hand numbers."""

from __future__ import annotations

import math

import pipeline.rl.logprobs as logprobs_module
import pytest
import torch
from torch.testing import assert_close

from pipeline.rl.kl import kl_per_token
from pipeline.rl.logprobs import logprobs_and_entropy, logprobs_of_tokens, row_blocks
from tests.pipeline.rl.hand_made_tensors import tensor


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


def test_logprob_gradient_equals_autograd_of_the_log_softmax_for_fp32_and_bf16_logits():
    torch.manual_seed(0)
    tokens = torch.randint(0, 13, (3, 4))
    for dtype, temperature in ((torch.float32, 1.0), (torch.float32, 0.7), (torch.bfloat16, 0.7)):
        logits = (3 * torch.randn(3, 4, 13)).to(dtype).requires_grad_()
        reference = logits.detach().clone().requires_grad_()
        upstream = torch.randn(3, 4)
        (logprobs_of_tokens(logits, tokens, temperature) * upstream).sum().backward()
        expected = torch.log_softmax(reference.float() / (temperature + 1e-7), -1).gather(-1, tokens[..., None])
        (expected.squeeze(-1) * upstream).sum().backward()
        assert logits.grad.dtype == dtype
        assert_close(logits.grad.float(), reference.grad.float(), atol=1e-6 if dtype == torch.float32 else 1e-2,
                     rtol=1e-5 if dtype == torch.float32 else 1e-2)
    # Double precision gradcheck of the hand-written backward, at a temperature.
    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: logprobs_of_tokens(x, tokens[:2, :3] % 7, 0.5).double(), (logits,))


def test_logprobs_and_entropy_match_the_separate_computations_and_the_training_path():
    torch.manual_seed(0)
    logits, tokens = 2 * torch.randn(2, 5, 31), torch.randint(0, 31, (2, 5))
    logprobs, entropy = logprobs_and_entropy(logits, tokens, 0.7)
    log_softmax = torch.log_softmax(logits / (0.7 + 1e-7), -1)
    assert_close(logprobs, log_softmax.gather(-1, tokens[..., None]).squeeze(-1))
    assert_close(entropy, -(log_softmax.exp() * log_softmax).sum(-1))
    # The scoring forward's old logprobs and the training forward's are the same numbers: PPO's first ratio is 1.
    assert torch.equal(logprobs, logprobs_of_tokens(logits, tokens, 0.7))
    assert logprobs_and_entropy(logits, None, 0.7)[0] is None


def test_row_blocks_cover_every_row_once_cache_sized_on_cpu_and_whole_elsewhere():
    blocks = row_blocks(10, 1 << 17, torch.device("cpu"))  # 2 rows of 128Ki fp32 logits make a 1 MiB block
    assert [(b.start, b.stop) for b in blocks] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert row_blocks(10, 1 << 30, torch.device("cpu")) == [slice(i, i + 1) for i in range(10)]  # at least a row
    assert row_blocks(10, 1 << 17, torch.device("meta")) == [slice(0, 10)]


def test_blockwise_logprobs_gradients_and_entropy_equal_one_block(monkeypatch):
    torch.manual_seed(0)
    logits, tokens, upstream = 2 * torch.randn(3, 5, 40), torch.randint(0, 40, (3, 5)), torch.randn(3, 5)
    results = []
    for block_bytes in (1 << 30, 4 * 40 * 2):  # all 15 rows at once, then blocks of 2 rows (the last of 1)
        monkeypatch.setattr(logprobs_module, "CPU_BLOCK_BYTES", block_bytes)
        leaf = logits.clone().requires_grad_()
        (logprobs_of_tokens(leaf, tokens, 0.8) * upstream).sum().backward()
        results.append((logprobs_of_tokens(logits, tokens, 0.8), leaf.grad, *logprobs_and_entropy(logits, tokens, 0.8)))
    for whole, blockwise in zip(*results):
        assert torch.equal(whole, blockwise)


def test_entropy_of_uniform_logits_is_log_vocabulary_size():
    entropy = logprobs_and_entropy(torch.zeros(2, 3, 17, dtype=torch.bfloat16), None, temperature=0.5)[1]
    assert entropy.dtype == torch.float32 and entropy.shape == (2, 3)
    assert_close(entropy, torch.full((2, 3), math.log(17)))
    # A one-hot-like distribution has (almost) no entropy; a temperature above 1 raises it.
    peaked = torch.tensor([[[50.0, 0.0, 0.0]]])
    assert logprobs_and_entropy(peaked, None)[1].item() < 1e-6
    assert logprobs_and_entropy(peaked, None, temperature=100.0)[1].item() > logprobs_and_entropy(peaked, None)[1].item()
    # Tokens masked to −inf count as probability 0, not as NaN.
    assert_close(logprobs_and_entropy(torch.tensor([[[0.0, 0.0, -math.inf]]]), None)[1], torch.tensor([[math.log(2)]]))


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
