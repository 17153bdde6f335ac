"""Uncertainty of accuracies measured on a finite test set, and paired comparisons of two models.

An accuracy on N test images is a binomial proportion: `wilson_interval` gives its confidence interval. Two models
evaluated on the same images are compared per image with the exact McNemar test (`mcnemar_exact`), which uses only
the images on which they disagree and is far more sensitive than comparing two overlapping intervals. `mean_std`
summarises repeated runs (seeds). scipy does the maths (imported on first use: every command imports this module
through the evaluation, and scipy.stats takes about a second to import).
"""

import numpy as np


def wilson_interval(num_correct, n, confidence=0.95):
    """The Wilson score interval of the proportion num_correct / n, as (low, high) floats in [0, 1].

    Args:
      num_correct: correctly classified images. n: images evaluated. confidence: the interval's level.

    Returns:
      (low, high).

    Example:

    >>> low, high = mtard_tf.wilson_interval(50, 100)
    >>> round(low, 3), round(high, 3)
    (0.404, 0.596)
    """
    num_correct, n = int(num_correct), int(n)
    if n <= 0 or not 0 <= num_correct <= n:
        raise ValueError(f"a proportion needs 0 <= num_correct <= n and n > 0, got {num_correct}/{n}")
    from scipy import stats
    interval = stats.binomtest(num_correct, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def mcnemar_exact(flags_a, flags_b):
    """The exact (binomial) two-sided McNemar test of paired per-image correctness flags of models a and b.

    `a_only` counts the images only a gets right, `b_only` those only b gets right; under the null hypothesis (equal
    accuracy) each discordant image is a fair coin, so p = binomtest(a_only, a_only + b_only, 0.5), and 1 when the
    models never disagree. Returns {"difference": accuracy(a) - accuracy(b), "a_only", "b_only", "n", "p_value"}.

    Example:

    >>> mtard_tf.mcnemar_exact([1, 1, 1, 0], [0, 0, 1, 0])["p_value"]
    0.5
    """
    a = np.asarray(flags_a, dtype=bool).reshape(-1)
    b = np.asarray(flags_b, dtype=bool).reshape(-1)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired flags need the same, non-zero number of images, got {a.size} and {b.size}")
    from scipy import stats
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    discordant = a_only + b_only
    p_value = float(stats.binomtest(a_only, discordant, 0.5).pvalue) if discordant else 1.0
    return {"difference": float(a.mean() - b.mean()), "a_only": a_only, "b_only": b_only, "n": int(a.size),
            "p_value": p_value}


def mean_std(values):
    """(mean, sample standard deviation with ddof=1) of a sequence of numbers; the std is None for one value."""
    values = np.asarray(list(values), dtype=np.float64)
    if values.size == 0:
        raise ValueError("mean_std needs at least one value")
    return float(values.mean()), (float(values.std(ddof=1)) if values.size > 1 else None)
