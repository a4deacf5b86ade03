"""Fitting scaling laws to a sweep's held-out losses, as Hoffmann et al. 2022 ("Chinchilla") do.

Approach 3: L(N, D) = E + A / N^α + B / D^β, fitted by minimising the Huber loss (δ = 1e-3) between the predicted
and the observed log-loss, with L-BFGS from a grid of initialisations, the best fit kept. The law is written in log
space as LSE(a − α log N, b − β log D, e) with A = exp(a), B = exp(b), E = exp(e), which keeps A, B, E positive.
Intervals come from refitting on points resampled with replacement (a bootstrap).

Approach 2: at each compute budget C, the loss against log N is near a parabola (the IsoFLOP profile); its minimum
is the compute-optimal size N*(C), and a line through log N*(C) against log C gives N* ∝ C^a (and D* ∝ C^(1−a)).

Compute is C ≈ 6 N D throughout, so the compute-optimal split of a budget under the fitted law has a closed form:
N*(C) = G (C / 6)^(β / (α + β)) with G = (α A / (β B))^(1 / (α + β)) (Hoffmann et al., appendix D.2).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np

HUBER_DELTA = 1e-3


@dataclass(frozen=True)
class LossLaw:
    E: float
    A: float
    alpha: float
    B: float
    beta: float

    def loss(self, parameters: float, tokens: float) -> float:
        return self.E + self.A / parameters ** self.alpha + self.B / tokens ** self.beta

    def compute_optimal(self, compute: float) -> tuple[float, float]:
        """(N, D) minimising the loss for C = 6 N D."""
        exponent = self.beta / (self.alpha + self.beta)
        scale = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        parameters = scale * (compute / 6) ** exponent
        return parameters, compute / (6 * parameters)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def huber(residuals: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    small = np.abs(residuals) <= delta
    return np.where(small, 0.5 * residuals ** 2, delta * (np.abs(residuals) - 0.5 * delta))


def predicted_log_loss(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    a, b, e, alpha, beta = theta
    return np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)


def objective_and_gradient(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray
                           ) -> tuple[float, np.ndarray]:
    """The summed Huber loss of the log-loss residuals and its exact gradient (L-BFGS needs it to be smooth)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    prediction = np.logaddexp.reduce(terms, axis=0)
    weights = np.exp(terms - prediction)  # the softmax: d prediction / d term
    residuals = prediction - log_l
    slope = np.clip(residuals, -HUBER_DELTA, HUBER_DELTA)  # d huber / d residual
    gradient = np.array([
        np.sum(slope * weights[0]), np.sum(slope * weights[1]), np.sum(slope * weights[2]),
        np.sum(slope * weights[0] * -log_n), np.sum(slope * weights[1] * -log_d)])
    return float(np.sum(huber(residuals))), gradient


# Hoffmann et al. start from a grid over α, β ∈ {0, 0.5, …, 2}, e ∈ {−1, −0.5, …, 1.5}, a ∈ {0, 5, …, 25},
# b ∈ {0, 5, …, 25}; a coarser grid of the same span (108 starts) finds the same minimum on this product's sweeps
# and keeps a fit to a second or two.
INITIAL_GRID = {"a": (0.0, 8.0, 16.0), "b": (0.0, 8.0, 16.0), "e": (-1.0, 0.0, 1.0), "alpha": (0.2, 0.8),
                "beta": (0.2, 0.8)}


# a, b ∈ [−20, 60] and e ∈ [−10, 5] keep A, B, E representable (exp(−800) is 0); α, β ∈ [0, 3].
LOG_SPACE_BOUNDS = [(-20.0, 60.0), (-20.0, 60.0), (-10.0, 5.0), (0.0, 3.0), (0.0, 3.0)]


def fit_loss_law(parameters: np.ndarray, tokens: np.ndarray, losses: np.ndarray,
                 starts: list[np.ndarray] | None = None) -> tuple[LossLaw, float]:
    """The law that best fits the points (approach 3) and its summed Huber loss."""
    from scipy.optimize import minimize

    log_n, log_d, log_l = np.log(parameters), np.log(tokens), np.log(losses)
    if starts is None:
        starts = [np.array(start) for start in itertools.product(*INITIAL_GRID.values())]
    best, best_value = None, math.inf
    for start in starts:
        result = minimize(objective_and_gradient, start, args=(log_n, log_d, log_l), jac=True, method="L-BFGS-B",
                          bounds=LOG_SPACE_BOUNDS)
        if result.fun < best_value:
            best, best_value = result.x, float(result.fun)
    a, b, e, alpha, beta = best
    return LossLaw(E=math.exp(e), A=math.exp(a), alpha=float(alpha), B=math.exp(b), beta=float(beta)), best_value


def law_parameters(law: LossLaw) -> np.ndarray:
    return np.array([math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta])


def bootstrap_intervals(parameters: np.ndarray, tokens: np.ndarray, losses: np.ndarray, law: LossLaw,
                        resamples: int, seed: int, coverage: float = 0.9) -> dict[str, tuple[float, float]]:
    """Central `coverage` intervals of E, A, α, B, β over refits on points drawn with replacement; each refit
    starts from the full fit and from a few grid points, which is where the full search ends up anyway."""
    rng = np.random.default_rng(seed)
    starts = [law_parameters(law), np.array([5.0, 5.0, 0.0, 0.5, 0.5]), np.array([10.0, 10.0, 0.0, 0.5, 0.5])]
    fits = []
    for _ in range(resamples):
        chosen = rng.integers(0, len(losses), len(losses))
        if len(set(parameters[chosen])) < 2 or len(set(tokens[chosen])) < 2:
            continue  # one size or one budget alone cannot separate the two terms
        fits.append(fit_loss_law(parameters[chosen], tokens[chosen], losses[chosen], starts)[0])
    if not fits:
        return {}
    tail = (1 - coverage) / 2 * 100
    return {name: tuple(float(v) for v in np.percentile([getattr(fit, name) for fit in fits], [tail, 100 - tail]))
            for name in ("E", "A", "alpha", "B", "beta")}


@dataclass
class IsoFlopProfile:
    compute: float
    points: list[tuple[float, float]]  # (N, loss), by N
    optimal_parameters: float | None  # the parabola's minimum, None when it is not a minimum inside the sizes
    reason: str = ""


def isoflop_profiles(runs: list[dict]) -> list[IsoFlopProfile]:
    """Per compute budget, a parabola of loss against log N through its runs (at least 3 sizes); its vertex is the
    compute-optimal size when it is a minimum within the sizes trained (an edge minimum says: widen the grid)."""
    profiles = []
    for compute in sorted({run["compute"] for run in runs}):
        points = sorted((run["non_embedding_parameters"], run["eval_loss"]) for run in runs
                        if run["compute"] == compute)
        if len(points) < 3:
            profiles.append(IsoFlopProfile(compute, points, None, "fewer than 3 sizes"))
            continue
        x = np.log([n for n, _ in points])
        curvature, slope, _ = np.polyfit(x, [loss for _, loss in points], 2)
        if curvature <= 0:
            profiles.append(IsoFlopProfile(compute, points, None, "no minimum (the profile bends down)"))
            continue
        vertex = -slope / (2 * curvature)
        if not x.min() <= vertex <= x.max():
            side = "smallest" if vertex < x.min() else "largest"
            profiles.append(IsoFlopProfile(compute, points, None, f"minimum beyond the {side} size"))
            continue
        profiles.append(IsoFlopProfile(compute, points, float(math.exp(vertex))))
    return profiles


def power_law_through(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """(exponent, coefficient) of y = coefficient × x^exponent by least squares in log-log; None under 2 points."""
    if len(xs) < 2:
        return None
    exponent, intercept = np.polyfit(np.log(xs), np.log(ys), 1)
    return float(exponent), float(math.exp(intercept))
