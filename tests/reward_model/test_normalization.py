"""reward_model/normalization.py: the score normalisation stored beside the weights."""

import torch

from reward_model.normalization import RewardNormalization


def test_normalization_round_trip(tmp_path):
    normalization = RewardNormalization.from_scores(torch.tensor([1.0, 3.0]))
    assert torch.allclose(normalization.apply(torch.tensor([1.0, 3.0])), torch.tensor([-0.7071, 0.7071]), atol=1e-4)
    normalization.save(tmp_path)
    assert (tmp_path / "reward_normalization.json").is_file()
    assert RewardNormalization.load(tmp_path) == normalization
    assert RewardNormalization.load(tmp_path / "none") == RewardNormalization(0.0, 1.0)
