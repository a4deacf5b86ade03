"""KL between policy and reference per token (the k1 and k3 estimators) and the
coefficient β: fixed, or adapted towards a target KL (Ziegler et al. 2019, section 2.2)."""

from __future__ import annotations

import torch
from torch import Tensor


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from samples of π. k1 = log π − log π_ref (unbiased, can be negative);
    k3 = (r − 1) − log r with r = π_ref/π (never negative, lower variance; biased as a reward: trl#4967)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        # expm1 keeps r − 1 exact near r = 1; the clamp guards the last ulp of rounding, so k3 is never negative
        return (torch.expm1(-log_ratio) + log_ratio).clamp(min=0)
    raise ValueError(f"kl_estimator: unknown estimator {estimator!r}; use 'k1' or 'k3'")


class FixedKLController:
    """β that stays where it was set."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019: move β proportionally to how far the measured KL is from a target, at most ±20% of
    the way per horizon."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL controller: target ({target}) and horizon ({horizon}) must be positive")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        # float(): a tensor KL would turn β into a tensor, and the checkpointed state would no longer be JSON
        proportional_error = max(-0.2, min(0.2, float(current_kl) / self.target - 1))
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        # A state saved by a FixedKLController holds only β: keep this controller's target and horizon.
        self.value = float(state["value"])
        self.target, self.horizon = float(state.get("target", self.target)), float(state.get("horizon", self.horizon))


def kl_controller_from_config(kl_coef: float, target_kl: float | None,
                              horizon: int) -> FixedKLController | AdaptiveKLController:
    """A fixed β, or Ziegler et al.'s adaptive β when a target KL is given."""
    if target_kl is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target_kl, horizon)
