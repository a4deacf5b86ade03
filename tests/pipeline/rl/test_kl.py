"""The fixed and adaptive KL controllers of pipeline/rl/kl.py: β moves towards the target within
Ziegler et al.'s clip, and the state round-trips through JSON (trainer_state.json) for exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from pipeline.rl.kl import AdaptiveKLController, FixedKLController, kl_controller_from_config


# ---------------------------------------------------------------- KL controllers
def test_adaptive_kl_controller_moves_beta_towards_the_target_within_the_clip():
    def after(current_kl: float) -> float:
        controller = AdaptiveKLController(0.1, target=6.0, horizon=1000)
        controller.update(current_kl, n_steps=100)
        return controller.value

    assert_close(after(6.6), 0.1 * (1 + 0.1 * 100 / 1000))  # 10% above target: β up 1%
    assert_close(after(5.4), 0.1 * (1 - 0.1 * 100 / 1000))  # 10% below target: β down 1%
    assert_close(after(60.0), 0.1 * (1 + 0.2 * 100 / 1000))  # far above: the error is clipped at +20%
    assert_close(after(0.0), 0.1 * (1 - 0.2 * 100 / 1000))  # far below: clipped at −20%
    assert after(6.0) == 0.1

    controller = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    for _ in range(10):
        controller.update(12.0, n_steps=100)
    assert_close(controller.value, 0.1 * 1.02 ** 10)


def test_kl_controller_state_round_trips_through_json():
    controller = AdaptiveKLController(0.05, target=4.0, horizon=500)
    controller.update(torch.tensor(5.0), n_steps=64)  # a tensor KL must not turn β into a tensor
    state = json.loads(json.dumps(controller.state_dict()))
    assert state == {"value": controller.value, "target": 4.0, "horizon": 500.0}
    restored = AdaptiveKLController(1.0, target=1.0, horizon=1)
    restored.load_state_dict(state)
    assert restored.state_dict() == controller.state_dict()
    restored.update(3.0, 64), controller.update(3.0, 64)
    assert restored.value == controller.value

    fixed = FixedKLController(0.05)
    fixed.update(100.0, n_steps=1000)
    assert fixed.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(json.loads(json.dumps(fixed.state_dict())))
    assert other.value == 0.05


def test_kl_controller_from_config_picks_fixed_or_adaptive():
    fixed = kl_controller_from_config(0.05, None, 10000)
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.05
    adaptive = kl_controller_from_config(0.2, 6.0, 10000)
    assert isinstance(adaptive, AdaptiveKLController)
    assert adaptive.state_dict() == {"value": 0.2, "target": 6.0, "horizon": 10000.0}
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
