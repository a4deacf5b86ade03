"""Masks and masked statistics of pipeline/rl/masked.py on hand-made tensors: the response mask cut at the
first EOS, means, variances, sums, token shares and whitening that padding never enters."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from pipeline.rl.masked import masked_mean, masked_sum, masked_var, masked_whiten, response_mask, token_share
from tests.pipeline.rl.hand_made_tensors import EOS, NAN, poisoned, tensor


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


def test_masked_sum_and_token_share_by_hand():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    values = poisoned(tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]]), mask, NAN)
    assert masked_sum(values, mask).item() == 7.0
    assert masked_sum(values, mask, dim=1).tolist() == [3.0, 4.0]
    assert_close(token_share(values, mask), torch.tensor(7.0 / 3))  # its own count: the masked mean
    assert_close(token_share(values, mask, token_count=10), torch.tensor(0.7))
    assert_close(token_share(values, mask, token_count=torch.tensor(10)), torch.tensor(0.7))
    assert token_share(values, torch.zeros_like(mask), token_count=0).item() == 0.0  # no token: 0, not NaN


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


def whiten_on_two_processes(halves, masks, **kwargs):
    """masked_whiten run by two threads as two processes would run it, `sum_over_processes` an all-reduce sum
    through a barrier."""
    import threading

    barrier, posted, results = threading.Barrier(2), [None, None], [None, None]

    def all_reduce_sum(rank):
        def reduce(tensor):
            posted[rank] = tensor
            barrier.wait()
            total = posted[0] + posted[1]
            barrier.wait()  # both read before either posts its next tensor
            return total
        return reduce

    def run(rank):
        results[rank] = masked_whiten(halves[rank], masks[rank], sum_over_processes=all_reduce_sum(rank), **kwargs)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whitening_over_all_processes_equals_whitening_their_batches_joined(shift_mean):
    """ppo.advantage_whitening=global: each process's tokens whitened with the mean and variance of every process's
    valid tokens, exactly what one process holding both batches computes (padding still ignored, even NaN)."""
    torch.manual_seed(0)
    values = torch.randn(6, 5) * 3 + 1
    mask = torch.rand(6, 5) > 0.3
    values[~mask] = float("nan")
    joined = masked_whiten(values, mask, shift_mean=shift_mean)
    first, second = whiten_on_two_processes((values[:2], values[2:]), (mask[:2], mask[2:]), shift_mean=shift_mean)
    torch.testing.assert_close(torch.cat([first, second]), joined)
    per_process = masked_whiten(values[:2], mask[:2], shift_mean=shift_mean)
    assert not torch.allclose(per_process, first)  # the rows of one process alone have other moments
