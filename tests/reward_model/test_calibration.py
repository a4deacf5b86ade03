"""reward_model/calibration.py: reliability bins of the preference probabilities."""

import pytest
import torch

from reward_model.calibration import preference_calibration


def test_preference_calibration_bins_both_orders_of_each_pair():
    log3 = torch.log(torch.tensor(3.0)).item()
    # σ of the score gaps: 0.75, 0.5, 0.25; the third pair's chosen response is in fact the worse one
    calibration = preference_calibration(torch.tensor([log3, 0.0, 0.0]), torch.tensor([0.0, 0.0, log3]),
                                         torch.tensor([True, True, False]), bins=2)
    low, high = calibration["bins"]
    # both orders: predicted (0.75, 0.5, 0.25, 0.25, 0.5, 0.75), observed (1, 1, 0, 0, 0, 1)
    assert (low["count"], low["mean_predicted"], low["observed"]) == (2, pytest.approx(0.25), 0.0)
    assert (high["count"], high["mean_predicted"], high["observed"]) == (4, pytest.approx(0.625), 0.75)
    assert (low["low"], low["high"], high["high"]) == (0.0, 0.5, 1.0)
    assert calibration["expected_calibration_error"] == pytest.approx(2 / 6 * 0.25 + 4 / 6 * 0.125)


def test_preference_calibration_against_the_labels_themselves():
    undecided = preference_calibration(torch.zeros(4), torch.zeros(4))  # p = 0.5, and each pair counts both ways
    assert undecided["expected_calibration_error"] == pytest.approx(0.0)
    assert [b["count"] for b in undecided["bins"]] == [0] * 5 + [8] + [0] * 4
    assert undecided["bins"][0]["mean_predicted"] is None and undecided["bins"][0]["observed"] is None
    confident = torch.full((4,), 20.0)
    assert preference_calibration(confident, torch.zeros(4))["expected_calibration_error"] == pytest.approx(0.0, abs=1e-6)
    half_wrong = preference_calibration(confident, torch.zeros(4), torch.tensor([True, False, True, False]))
    assert half_wrong["expected_calibration_error"] == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError, match="3 chosen but 2 rejected"):
        preference_calibration(torch.zeros(3), torch.zeros(2))
