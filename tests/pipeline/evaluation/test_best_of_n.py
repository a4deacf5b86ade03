import itertools
import math

import pytest

from pipeline.evaluation.best_of_n import best_of_n_kl, best_of_n_weights, expected_best_of_n


def test_best_of_two_from_a_pool_of_four_by_hand():
    """Ranks by score: sample 2 (0.1), 0 (0.3), 3 (0.5), 1 (0.9); of the C(4,2) = 6 pairs, the highest-ranked
    sample is the maximum of 3, the next of 2, the next of 1."""
    scores, gold = [0.3, 0.9, 0.1, 0.5], [1.0, 2.0, 3.0, 4.0]
    assert best_of_n_weights(scores, 2) == pytest.approx([1 / 6, 3 / 6, 0.0, 2 / 6])
    # The six pairs' picks: {0,1}→1, {0,2}→0, {0,3}→3, {1,2}→1, {1,3}→1, {2,3}→3: gold 2+1+4+2+2+4 = 15.
    assert expected_best_of_n(scores, gold, 2) == pytest.approx(15 / 6)


def test_n_equal_to_the_pool_is_the_argmax_and_n_one_is_the_mean():
    scores, gold = [0.2, -1.0, 0.7, 0.1, 0.4], [3.0, 1.0, -2.0, 0.5, 4.0]
    assert expected_best_of_n(scores, gold, 5) == -2.0
    assert expected_best_of_n(scores, gold, 1) == pytest.approx(sum(gold) / 5)
    assert expected_best_of_n(scores, scores, 3) > expected_best_of_n(scores, scores, 2)  # the proxy only rises


def test_matches_enumerating_every_subset_with_ties_going_to_the_earlier_sample():
    scores, gold = [1.0, 2.0, 1.0, 2.0, 0.0, 2.0], [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    for n in range(1, 7):
        picks = [max(subset, key=lambda i: (scores[i], -i)) for subset in itertools.combinations(range(6), n)]
        assert expected_best_of_n(scores, gold, n) == pytest.approx(sum(gold[i] for i in picks) / len(picks))
    assert best_of_n_weights([1.0, 1.0], 2) == [1.0, 0.0]


def test_kl_of_best_of_n_and_bad_arguments():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    with pytest.raises(ValueError, match="pool holds 3"):
        best_of_n_weights([0.0, 1.0, 2.0], 4)
    with pytest.raises(ValueError, match="2 values for 3"):
        expected_best_of_n([0.0, 1.0, 2.0], [1.0, 2.0], 1)
    with pytest.raises(ValueError):
        best_of_n_kl(0)
