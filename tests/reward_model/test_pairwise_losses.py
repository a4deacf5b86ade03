"""reward_model/losses.py: the pairwise loss with margins and its accuracy, by hand."""

import pytest
import torch

from reward_model.losses import pairwise_accuracy, pairwise_loss


def test_pairwise_loss_margin_weights_and_accuracy():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    logsigmoid = torch.nn.functional.logsigmoid
    expected = -(logsigmoid(torch.tensor(2.0)) + logsigmoid(torch.tensor(-1.0))) / 2
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(expected.item())
    with_margin = -(logsigmoid(torch.tensor(1.0)) + logsigmoid(torch.tensor(-2.0))) / 2
    assert pairwise_loss(chosen, rejected, margin=1.0).item() == pytest.approx(with_margin.item())
    weighted = pairwise_loss(chosen, rejected, weights=torch.tensor([1.0, 0.0]))
    assert weighted.item() == pytest.approx(-logsigmoid(torch.tensor(2.0)).item())
    assert pairwise_accuracy(chosen, rejected) == 0.5
    assert pairwise_accuracy(torch.tensor([1.0]), torch.tensor([1.0])) == 0.0  # a tie is not a win
