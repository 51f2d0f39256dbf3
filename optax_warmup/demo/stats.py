"""The statistics of the demo's experiments: plain functions of plain numbers.

A run's final error is Goyal et al.'s (the median of its last 5 epochs); a
configuration is summarized over its seeds by the mean and the sample standard
deviation, and compared with the reference configuration by the gap of the means,
its standard error and a two-sided Welch t-test (unequal variances).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

FINAL_EPOCHS = 5  # Goyal: a run's error is the median of its last 5 epochs


def final_error(test_errors: Sequence[float]) -> float:
    """A run's final error as Goyal reports it: the median of the last 5 epochs.

    >>> final_error([0.9, 0.5, 0.1, 0.2, 0.3, 0.4, 0.2])
    0.2
    """
    return float(np.median(np.asarray(test_errors[-FINAL_EPOCHS:], np.float64)))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (ddof=1; 0 for a single value).

    >>> mean_std([1.0, 2.0, 3.0])
    (2.0, 1.0)
    """
    array = np.asarray(values, np.float64)
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return float(array.mean()), std


def welch_p_value(a: Sequence[float], b: Sequence[float]) -> float | None:
    """The two-sided p-value of Welch's t-test that ``a`` and ``b`` share a mean.

    With sample means ``m``, sample variances ``s²`` (ddof=1) and sizes ``n``::

      t = (m_a − m_b) / √(s_a²/n_a + s_b²/n_b)
      ν = (s_a²/n_a + s_b²/n_b)² / ((s_a²/n_a)²/(n_a − 1) + (s_b²/n_b)²/(n_b − 1))
      p = 2 · P(T_ν > |t|)        (Student's t with ν degrees of freedom)

    which is ``scipy.stats.ttest_ind(a, b, equal_var=False).pvalue``.

    Edge cases: fewer than 2 values on either side leave the variance, hence the
    test, undefined: None. Both sides constant: 0.0 if the means differ (|t| is
    infinite), None if they are equal (t is 0/0).

    >>> round(welch_p_value([0.10, 0.12, 0.14], [0.15, 0.15, 0.15]), 3)
    0.122
    >>> welch_p_value([0.1], [0.2, 0.3]) is None
    True

    References:
      Welch 1947, The generalization of "Student's" problem when several different
      population variances are involved, Biometrika 34.
    """
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.size < 2 or y.size < 2:
        return None
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    diff = float(x.mean() - y.mean())
    if vx + vy == 0:
        return None if diff == 0 else 0.0
    t = diff / math.sqrt(vx + vy)
    dof = (vx + vy) ** 2 / (vx**2 / (x.size - 1) + vy**2 / (y.size - 1))
    from scipy import stats

    return float(2 * stats.t.sf(abs(t), dof))


def versus_reference(
    errors: Sequence[float], reference: Sequence[float]
) -> dict[str, Any]:
    """The gap of the mean errors to the reference, its standard error, Welch's p.

    ``gap_standard_error = √(s²/n + s_ref²/n_ref)`` (0 with one seed each).
    """
    mean, std = mean_std(errors)
    ref_mean, ref_std = mean_std(reference)
    return {
        "gap_vs_reference": mean - ref_mean,
        "gap_standard_error": math.sqrt(
            std**2 / len(errors) + ref_std**2 / len(reference)
        ),
        "p_value": welch_p_value(errors, reference),
    }
