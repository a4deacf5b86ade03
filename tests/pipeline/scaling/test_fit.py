import math

import numpy as np
import pytest

from pipeline.scaling.fit import (
    LossLaw,
    bootstrap_intervals,
    fit_loss_law,
    huber,
    isoflop_profiles,
    objective_and_gradient,
    power_law_through,
)

TRUE = LossLaw(E=1.7, A=400.0, alpha=0.34, B=410.0, beta=0.28)  # Hoffmann et al.'s law, rounded


def grid_of_runs(law: LossLaw, noise: float, seed: int = 0):
    sizes = np.array([5e4, 1e5, 2.3e5, 4.5e5, 8e5, 1.8e6])
    budgets = np.array([2.5e11, 5e11, 1e12, 2e12, 4e12])
    n, c = (grid.ravel() for grid in np.meshgrid(sizes, budgets))
    d = c / (6 * n)
    losses = np.array([law.loss(a, b) for a, b in zip(n, d)]) * np.exp(np.random.default_rng(seed).normal(0, noise, n.size))
    return n, d, losses, c


def test_fit_recovers_a_known_law_from_noisy_losses():
    n, d, losses, _ = grid_of_runs(TRUE, noise=0.001)
    law, objective = fit_loss_law(n, d, losses)
    assert law.alpha == pytest.approx(TRUE.alpha, abs=0.02)
    assert law.beta == pytest.approx(TRUE.beta, abs=0.02)
    assert law.E == pytest.approx(TRUE.E, rel=0.05)
    assert objective < 1e-3


def test_bootstrap_intervals_hold_the_fit_and_widen_with_noise():
    n, d, losses, _ = grid_of_runs(TRUE, noise=0.001)
    law, _ = fit_loss_law(n, d, losses)
    quiet = bootstrap_intervals(n, d, losses, law, resamples=20, seed=0)
    n, d, noisy_losses, _ = grid_of_runs(TRUE, noise=0.02)
    noisy = bootstrap_intervals(n, d, noisy_losses, fit_loss_law(n, d, noisy_losses)[0], resamples=20, seed=0)
    low, high = quiet["alpha"]
    assert low <= law.alpha <= high
    assert noisy["beta"][1] - noisy["beta"][0] > high - low


def test_objective_gradient_matches_finite_differences():
    n, d, losses, _ = grid_of_runs(TRUE, noise=0.01)
    theta = np.array([5.0, 6.0, 0.3, 0.4, 0.3])
    _, gradient = objective_and_gradient(theta, np.log(n), np.log(d), np.log(losses))
    for i in range(5):
        step = np.zeros(5)
        step[i] = 1e-6
        plus = objective_and_gradient(theta + step, np.log(n), np.log(d), np.log(losses))[0]
        minus = objective_and_gradient(theta - step, np.log(n), np.log(d), np.log(losses))[0]
        assert gradient[i] == pytest.approx((plus - minus) / 2e-6, rel=1e-4, abs=1e-9)


def test_huber_is_quadratic_then_linear():
    assert huber(np.array([5e-4]))[0] == pytest.approx(0.5 * 5e-4 ** 2)
    assert huber(np.array([-0.1]))[0] == pytest.approx(1e-3 * (0.1 - 0.5e-3))


def test_compute_optimal_split_minimises_the_loss_at_that_budget():
    compute = 1e15
    n, d = TRUE.compute_optimal(compute)
    assert 6 * n * d == pytest.approx(compute)
    best = TRUE.loss(n, d)
    for factor in (0.7, 1.4):
        assert TRUE.loss(n * factor, compute / (6 * n * factor)) > best


def test_isoflop_profiles_find_the_optimal_size_and_say_when_it_is_outside():
    n, _, losses, c = grid_of_runs(TRUE, noise=0.0)
    runs = [{"compute": cc, "non_embedding_parameters": nn, "eval_loss": ll} for cc, nn, ll in zip(c, n, losses)]
    profiles = isoflop_profiles(runs)
    for profile in profiles:
        truth = TRUE.compute_optimal(profile.compute)[0]
        assert profile.optimal_parameters == pytest.approx(truth, rel=0.15)
    # Only the three largest sizes: the minimum lies below them.
    edge = isoflop_profiles([r for r in runs if r["non_embedding_parameters"] >= 4.5e5 and r["compute"] == 2.5e11])
    assert edge[0].optimal_parameters is None and "smallest" in edge[0].reason
    assert isoflop_profiles(runs[:2])[0].reason == "fewer than 3 sizes"


def test_power_law_through_points_on_a_line():
    exponent, coefficient = power_law_through([1.0, 10.0, 100.0], [3.0, 3.0 * 10 ** 0.5, 30.0])
    assert exponent == pytest.approx(0.5) and coefficient == pytest.approx(3.0)
    assert power_law_through([1.0], [2.0]) is None
    assert math.isfinite(exponent)
