"""Tests of mtard_tf.evaluation.stats against values computed by hand."""

import math

import numpy as np
import pytest
from scipy.stats import norm

from mtard_tf.evaluation import stats


def wilson_by_hand(k, n, confidence=0.95):
    z = norm.ppf(1 - (1 - confidence) / 2)
    p = k / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


@pytest.mark.parametrize("k, n", [(40, 100), (0, 20), (20, 20), (264, 500)])
def test_wilson_interval_is_the_closed_form(k, n):
    low, high = stats.wilson_interval(k, n)
    expected = wilson_by_hand(k, n)
    assert low == pytest.approx(expected[0], abs=1e-12) and high == pytest.approx(expected[1], abs=1e-12)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_wilson_interval_40_of_100():
    assert stats.wilson_interval(40, 100) == pytest.approx((0.30940, 0.49800), abs=1e-5)
    wide = stats.wilson_interval(40, 100, confidence=0.99)
    assert wide[0] < 0.30940 and wide[1] > 0.49800


def test_wilson_interval_rejects_impossible_counts():
    for k, n in ((1, 0), (5, 4), (-1, 4)):
        with pytest.raises(ValueError):
            stats.wilson_interval(k, n)


def paired(a_only, b_only, both=0, neither=0):
    a = [True] * a_only + [False] * b_only + [True] * both + [False] * neither
    b = [False] * a_only + [True] * b_only + [True] * both + [False] * neither
    return np.array(a), np.array(b)


def test_mcnemar_exact_8_against_2():
    a, b = paired(8, 2, both=30, neither=10)
    result = stats.mcnemar_exact(a, b)
    # Two-sided exact: 2 * P(X <= 2), X ~ Binomial(10, 1/2) = 2 * (1 + 10 + 45) / 1024.
    assert result["p_value"] == pytest.approx(2 * 56 / 1024) == pytest.approx(0.109375)
    assert result == {"difference": pytest.approx((38 - 32) / 50), "a_only": 8, "b_only": 2, "n": 50,
                      "p_value": pytest.approx(0.109375)}
    swapped = stats.mcnemar_exact(b, a)
    assert swapped["p_value"] == pytest.approx(0.109375) and swapped["difference"] == pytest.approx(-0.12)
    assert (swapped["a_only"], swapped["b_only"]) == (2, 8)


def test_mcnemar_exact_without_a_difference():
    assert stats.mcnemar_exact(*paired(5, 5, both=3))["p_value"] == 1.0
    identical = stats.mcnemar_exact(*paired(0, 0, both=4, neither=3))
    assert identical == {"difference": 0.0, "a_only": 0, "b_only": 0, "n": 7, "p_value": 1.0}


def test_mcnemar_exact_is_significant_for_a_lopsided_split():
    # 10 against 0: p = 2 / 2**10.
    assert stats.mcnemar_exact(*paired(10, 0, neither=5))["p_value"] == pytest.approx(2 / 1024)


def test_mcnemar_exact_needs_paired_flags():
    with pytest.raises(ValueError):
        stats.mcnemar_exact([True, False], [True])


def test_mean_std():
    mean, std = stats.mean_std([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1)  # sample std (ddof=1)
    assert stats.mean_std([0.42]) == (0.42, None)
    with pytest.raises(ValueError):
        stats.mean_std([])
