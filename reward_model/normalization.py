"""The reward model's score normalisation: mean and std of its scores on SFT samples, stored beside the
weights, so that PPO's rewards are on a scale its KL coefficient was chosen for."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

NORMALIZATION_FILE = "reward_normalization.json"


@dataclass
class RewardNormalization:
    """Scores minus the mean, over the std, of the SFT policy's own samples: PPO then starts from rewards
    around 0 with unit spread, whatever offset and scale the Bradley–Terry loss (blind to both) left."""

    mean: float = 0.0
    std: float = 1.0

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.mean) / self.std

    def save(self, directory: str | Path) -> None:
        (Path(directory) / NORMALIZATION_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> RewardNormalization:
        """The statistics stored in a reward checkpoint, or the identity (0, 1) when it has none."""
        path = Path(directory) / NORMALIZATION_FILE
        if not path.is_file():
            return cls()
        return cls(**json.loads(path.read_text()))

    @classmethod
    def from_scores(cls, scores: torch.Tensor) -> RewardNormalization:
        """Mean and std of a batch of scores; a std of 1 when there are too few to measure one."""
        std = float(scores.float().std()) if len(scores) > 1 else 1.0
        return cls(float(scores.float().mean()), max(std, 1e-6))
