"""Best-of-N sampling, the baseline an RLHF policy has to beat: draw N responses from the SFT policy and keep the one
the reward model scores highest.

Its expected score is estimated without bias from a pool of M ≥ N samples per prompt, over all N-subsets of the
pool at once (Nakano et al. 2021, WebGPT; Gao et al. 2022): sort the pool by reward-model score; the sample of
rank i (1-based, ascending) is the one kept from a uniformly random N-subset with probability
C(i−1, N−1) / C(M, N), the share of the subsets in which it is the highest. N = 1 is the pool's mean, N = M its
argmax. The KL of best-of-N to the SFT policy is the analytic log N − (N−1)/N nats (Stiennon et al. 2020; an upper
bound on the true KL, Beirami et al. 2024), so the baseline needs no log-likelihoods.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def best_of_n_weights(reward_scores: Sequence[float], n: int) -> list[float]:
    """The probability that each pool sample is the one best-of-`n` keeps, for a uniformly random n-subset of the
    pool. Equal reward scores go to the earlier sample of the pool, as argmax breaks ties, so the result is exact
    and deterministic even with ties."""
    pool = len(reward_scores)
    if not 1 <= n <= pool:
        raise ValueError(f"best-of-{n} needs 1 ≤ N ≤ the pool size, and the pool holds {pool} samples")
    # Ascending by score; among equal scores the earliest sample last, i.e. ranked highest.
    ascending = sorted(range(pool), key=lambda index: (reward_scores[index], -index))
    subsets = math.comb(pool, n)
    weights = [0.0] * pool
    for rank, index in enumerate(ascending, start=1):
        weights[index] = math.comb(rank - 1, n - 1) / subsets
    return weights


def expected_best_of_n(reward_scores: Sequence[float], values: Sequence[float], n: int) -> float:
    """The expected value (a gold score, or the reward-model score itself) of the sample best-of-`n` keeps, the
    samples being chosen by `reward_scores`."""
    if len(values) != len(reward_scores):
        raise ValueError(f"best-of-{n}: {len(values)} values for {len(reward_scores)} reward scores")
    return sum(weight * value for weight, value in zip(best_of_n_weights(reward_scores, n), values))


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n ‖ SFT policy) in nats: log n − (n − 1)/n."""
    if n < 1:
        raise ValueError(f"best-of-{n}: N must be at least 1")
    return math.log(n) - (n - 1) / n
