"""The statistics of the demo's experiments: plain functions of plain numbers.

A run's final error is Goyal et al.'s (the median of its last 5 epochs); a
configuration is summarized over its seeds by the mean and the sample standard
deviation, and compared with the reference configuration by the gap of the means,
its standard error and a two-sided Welch t-test (unequal variances), or, robust to a
far seed, by the Hodges–Lehmann shift with its distribution-free interval and the
exact Mann–Whitney test (``shift``). The steps (or
examples) a run needs to reach a target error come from its error curve
(``count_to_target``), and McCandlish et al.'s critical batch from those counts at
several fixed batches (``fit_critical_batch``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

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


class Shift(NamedTuple):
    """How much larger ``a`` is than ``b``: an estimate, an interval and a p-value.

    Attributes:
      estimate: the Hodges–Lehmann shift, the median of the differences a_i − b_j.
      low: the interval's lower end (−inf when the samples are too small for the
        confidence asked).
      high: the interval's upper end (+inf likewise).
      coverage: the interval's exact coverage when the two samples differ only by
        a shift (at least the confidence asked; 1.0 for the infinite interval).
      p_value: the two-sided exact Mann–Whitney p-value of no shift.
    """

    estimate: float
    low: float
    high: float
    coverage: float
    p_value: float


@functools.cache
def _mann_whitney_null(m: int, n: int) -> tuple[int, ...]:
    """``counts[u]``: of the C(m+n, m) equally likely orderings of two samples of
    sizes m and n from one continuous distribution, how many have u pairs
    (a_i, b_j) with a_i > b_j. The largest of the m + n values is an a (beating
    all n of b) or a b, hence ``f(u; m, n) = f(u − n; m − 1, n) + f(u; m, n − 1)``.
    Exact integers.
    """
    if m == 0 or n == 0:
        return (1,)
    counts = [0] * (m * n + 1)
    for u, c in enumerate(_mann_whitney_null(m - 1, n)):
        counts[u + n] += c
    for u, c in enumerate(_mann_whitney_null(m, n - 1)):
        counts[u] += c
    return tuple(counts)


def _finite_sample(name: str, values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, np.float64)
    if array.ndim != 1 or array.size == 0 or not np.isfinite(array).all():
        raise ValueError(
            f"{name} must be a non-empty sequence of finite numbers, got {values!r}"
        )
    return array


def shift(a: Sequence[float], b: Sequence[float], *, confidence: float = 0.9) -> Shift:
    """The shift of ``a`` over ``b``, with an interval that no single seed can move.

    With the mn differences ``d_ij = a_i − b_j`` sorted as d_(1) ≤ … ≤ d_(mn)::

      estimate  = median(d_ij)                        (Hodges–Lehmann)
      interval  = [d_(k), d_(mn+1−k)],  k the largest with P(U ≤ k − 1) ≤ α/2
      coverage  = 1 − 2 · P(U ≤ k − 1),               α = 1 − confidence
      p         = min(1, 2 · min(P(U ≤ u), P(U ≥ u)))
      u         = #(a_i > b_j) + #(a_i = b_j) / 2

    where U is the Mann–Whitney statistic under no shift (``_mann_whitney_null``,
    exact). The interval is distribution-free: it covers the true shift with
    probability ``coverage`` whenever ``a`` and ``b`` have the same distribution up
    to a shift, whatever that distribution (a heavy tail of diverging seeds
    included). Being order statistics of the differences, its ends ignore the
    k − 1 largest and smallest differences: with 6 seeds a side at 90% (k = 8), one
    far seed, whose 6 differences are the most extreme, cannot move either end;
    with 3 a side (k = 1) the ends are the extreme differences and one seed moves
    them. ``p`` is ``scipy.stats.mannwhitneyu(a, b, method="exact").pvalue`` when
    no values tie; a tie counts one half, on the null of untied data, which makes
    ``p`` approximate (it can be smaller than the exact permutation p of the tied
    values) where errors on a test set's grid tie between samples.

    Edge cases: samples too small for the confidence asked (2 and 2 at 90%: the
    most extreme ordering already has probability 1/6 > 0.05) give the infinite
    interval with coverage 1.0.

    Args:
      a, b: the two samples (e.g. one final error per seed), finite.
      confidence: the interval's nominal two-sided confidence, in (0, 1).

    Returns:
      A ``Shift``.

    Raises:
      ValueError: an empty or non-finite sample, or ``confidence`` outside (0, 1).

    >>> r = shift([1.2, 1.3, 1.0, 1.5, 1.1], [0.8, 0.7, 0.9, 0.75, 0.85])
    >>> round(r.estimate, 3), round(r.low, 3), round(r.high, 3), round(r.p_value, 4)
    (0.4, 0.25, 0.6, 0.0079)

    References:
      Hodges & Lehmann 1963, Estimates of location based on rank tests, Ann. Math.
      Statist. 34; Lehmann 1975, Nonparametrics, chapter 2 (the interval).
    """
    x, y = _finite_sample("a", a), _finite_sample("b", b)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    d = np.sort((x[:, None] - y[None, :]).ravel())
    counts = np.asarray(_mann_whitney_null(x.size, y.size), np.float64)
    cdf = np.cumsum(counts) / counts.sum()  # P(U ≤ u)
    k = int(np.searchsorted(cdf, (1 - confidence) / 2 * (1 + 1e-12), side="right"))
    if k == 0:
        low, high, coverage = -math.inf, math.inf, 1.0
    else:
        low, high, coverage = float(d[k - 1]), float(d[d.size - k]), 1 - 2 * cdf[k - 1]
    u = float((x[:, None] > y).sum() + 0.5 * (x[:, None] == y).sum())
    below = cdf[math.floor(u)]  # P(U ≤ u)
    above = cdf[x.size * y.size - math.ceil(u)]  # P(U ≥ u) = P(U ≤ mn − u): no 1 − ε
    return Shift(
        estimate=float(np.median(d)),
        low=low,
        high=high,
        coverage=float(coverage),
        p_value=float(min(1.0, 2 * min(below, above))),
    )


def count_to_target(
    counts: Sequence[float], errors: Sequence[float], target: float
) -> float | None:
    """The steps (or examples) at which an error curve first reaches ``target``.

    ``errors[i]`` is the error evaluated after ``counts[i]`` steps (or examples);
    between two evaluations the curve is taken as linear, so the first crossing,
    from ``errors[i-1] > target`` to ``errors[i] <= target``, is at::

      counts[i-1] + (errors[i-1] − target) / (errors[i-1] − errors[i])
                    · (counts[i] − counts[i-1])

    Edge cases: a curve at or below ``target`` at its first evaluation gives
    ``counts[0]`` (nothing is known before it: prepend ``(0, initial error)`` to
    interpolate from the start); a curve that never gets there gives None; a
    non-finite error (a diverged run) is never at or below ``target``, and a
    crossing right after one is placed at the evaluation that shows it.

    Args:
      counts: the steps (or examples) of each evaluation, non-decreasing.
      errors: the error at each evaluation.
      target: the error to reach.

    Returns:
      The interpolated count, or None when no evaluation reaches ``target``.

    Raises:
      ValueError: empty or unequal ``counts`` and ``errors``, ``counts`` not
        finite or decreasing, or ``target`` not finite.

    >>> count_to_target([100, 200, 300], [0.5, 0.3, 0.1], 0.2)
    250.0
    >>> count_to_target([100, 200], [0.5, 0.3], 0.2) is None
    True
    """
    x = np.asarray(counts, np.float64)
    y = np.asarray(errors, np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"counts must be a non-empty sequence, got {counts!r}")
    if y.shape != x.shape:
        raise ValueError(
            f"errors has {y.size} values but counts has {x.size}: one per evaluation"
        )
    if not np.isfinite(x).all() or (np.diff(x) < 0).any():
        raise ValueError(f"counts must be finite and non-decreasing, got {counts!r}")
    if not math.isfinite(target):
        raise ValueError(f"target must be finite, got {target!r}")
    reached = np.flatnonzero(y <= target)  # NaN compares False: never reached
    if reached.size == 0:
        return None
    i = int(reached[0])
    if i == 0 or not np.isfinite(y[i - 1]):
        return float(x[i])
    fraction = (y[i - 1] - target) / (y[i - 1] - y[i])
    return float(x[i - 1] + fraction * (x[i] - x[i - 1]))


class CriticalBatch(NamedTuple):
    """McCandlish et al.'s trade-off fitted to (steps, examples) points.

    Attributes:
      s_min: S_min, the fewest steps to the target (an infinite batch).
      e_min: E_min, the fewest examples to the target (a batch of 1).
      b_crit: ``e_min / s_min``, the critical batch.
      rms_log_error: the root mean square of the fit's log residuals, the typical
        relative misfit of a point (0.05: about 5%).
      batches: the batches of the fitted curve, geometric over the points'
        batches widened 4× on each side.
      steps: the fitted steps at ``batches``, ``s_min + e_min / batches``.
      examples: the fitted examples at ``batches``, ``batches · steps``.
    """

    s_min: float
    e_min: float
    b_crit: float
    rms_log_error: float
    batches: tuple[float, ...]
    steps: tuple[float, ...]
    examples: tuple[float, ...]


def _positive_vector(name: str, values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, np.float64)
    if array.ndim != 1 or array.size < 2:
        raise ValueError(
            f"{name} must be a sequence of at least 2 points (one per batch), got "
            f"{values!r}"
        )
    if not (np.isfinite(array) & (array > 0)).all():
        raise ValueError(f"{name} must be finite and > 0, got {values!r}")
    return array


def fit_critical_batch(
    steps: Sequence[float], examples: Sequence[float], *, curve_points: int = 64
) -> CriticalBatch:
    """Fits McCandlish et al.'s steps/examples trade-off; returns S_min, E_min, B_crit.

    Each point is one fixed batch B: the optimizer steps S and the examples
    E = B·S that it took to reach a target error. The paper's model of the
    trade-off, and its critical batch, are::

      (S/S_min − 1)(E/E_min − 1) = 1,        B_crit = E_min / S_min

    which, along the front, reads S(B) = S_min (1 + B_crit/B) and
    E(B) = E_min (1 + B/B_crit). The batch of each point is known, B = E/S, so
    this is the explicit curve ``Ŝ(B) = S_min + E_min/B``, and the fit minimizes::

      Σ_i (log S_i − log Ŝ(B_i))²      over (log S_min, log E_min)

    Why this parametrization: the counts to a target scatter by a factor (a seed
    that needs 10% more steps), so each point counts by its relative misfit, and
    the largest S (the smallest batch) does not outweigh the rest as it would in
    a linear least squares on S (or the largest E on E). Since E = B·S, the log
    residual of E is the same number as that of S: fitting steps or examples, or
    both, gives one answer, symmetric in the two axes of the paper's figures.
    Fitting log S_min and log E_min keeps both positive. The start is the linear
    least squares of ``1 = S_min/S_i + E_min/(B_i S_i)`` (the same residuals to
    first order); the minimum is found by ``scipy.optimize.least_squares``.

    Edge cases: points that show no diminishing return within their batches
    (S ∝ 1/B) drive S_min to 0, and points that show no speed-up (S constant)
    drive E_min to 0; both stop at a bound 10⁶× below the smallest measured S
    (or E), so a ``b_crit`` far outside the measured batches says only that the
    critical batch lies beyond them. Two points whose S falls and E rises with B
    fit exactly (two unknowns).

    Args:
      steps: S of each point, > 0: one per run at a fixed batch (the runs of
        several seeds may share a batch).
      examples: E of each point, > 0, in the same order.
      curve_points: the points of the fitted curve (at least 2).

    Returns:
      A ``CriticalBatch``: S_min, E_min, B_crit, the misfit and the fitted curve.

    Raises:
      ValueError: fewer than 2 points, a value that is not finite and > 0,
        ``steps`` and ``examples`` of different lengths, or every point at the
        same batch E/S (the trade-off is then not identifiable).

    >>> fit = fit_critical_batch([300.0, 200.0, 150.0], [3e4, 4e4, 6e4])  # B=100…400
    >>> round(fit.s_min), round(fit.e_min), round(fit.b_crit)
    (100, 20000, 200)

    References:
      McCandlish, Kaplan, Amodei et al. 2018, An Empirical Model of Large-Batch
      Training, arXiv:1812.06162.
    """
    s = _positive_vector("steps", steps)
    e = _positive_vector("examples", examples)
    if e.size != s.size:
        raise ValueError(
            f"examples has {e.size} points but steps has {s.size}: one pair per batch"
        )
    if curve_points < 2:
        raise ValueError(f"curve_points must be at least 2, got {curve_points!r}")
    b = e / s
    if np.ptp(np.log(b)) < 1e-9:
        raise ValueError(
            f"examples / steps is the same batch at every point ({b[0]:g}): the "
            "trade-off needs at least two batches"
        )
    log_s = np.log(s)
    span = math.log(1e6)
    lower = np.array([log_s.min() - span, np.log(e).min() - span])
    upper = np.array([log_s.max(), np.log(e).max()])

    def residuals(theta: np.ndarray) -> np.ndarray:
        return log_s - np.logaddexp(theta[0], theta[1] - np.log(b))

    design = np.stack([1 / s, 1 / e], axis=1)  # S_min/S + E_min/(B·S) = 1
    linear = np.linalg.lstsq(design, np.ones_like(s), rcond=None)[0]
    fallback = np.array([s.min(), e.min()]) / 2
    start = np.log(np.where(linear > 0, linear, fallback))
    start = np.clip(start, lower + 1e-6, upper - 1e-6)
    from scipy import optimize

    theta = optimize.least_squares(
        residuals, start, bounds=(lower, upper), x_scale=1.0, xtol=1e-12, ftol=1e-12
    ).x
    s_min, e_min = float(np.exp(theta[0])), float(np.exp(theta[1]))
    curve_b = np.geomspace(b.min() / 4, b.max() * 4, curve_points)
    curve_s = s_min + e_min / curve_b
    return CriticalBatch(
        s_min=s_min,
        e_min=e_min,
        b_crit=e_min / s_min,
        rms_log_error=float(np.sqrt(np.mean(residuals(theta) ** 2))),
        batches=tuple(map(float, curve_b)),
        steps=tuple(map(float, curve_s)),
        examples=tuple(map(float, curve_b * curve_s)),
    )


def noise_scale_of_sums(trace_sum: float, g2_sum: float) -> float | None:
    """B_simple averaged as McCandlish et al. average it, ``Σ tr(Σ) / Σ |G|²``;
    None unless both sums are finite and positive (a diverged run, or |G|² never
    measured above the noise)."""
    if not (math.isfinite(trace_sum) and math.isfinite(g2_sum)):
        return None
    return trace_sum / g2_sum if trace_sum > 0 and g2_sum > 0 else None


def _fit_or_none(points: Sequence[tuple[float, float]]) -> CriticalBatch | None:
    """The fit of ``points``, or None when they hold fewer than three batches (two
    parameters fit two batches exactly, whatever the points, and say nothing)."""
    if len({round(e / s, 6) for s, e in points}) < 3:
        return None
    steps, examples = zip(*points, strict=True)
    return fit_critical_batch(steps, examples)


def critical_batch_vs_noise_scale(
    points: Mapping[Any, Sequence[tuple[float, float]]],
    noise_scales: Mapping[Any, Sequence[float | None]],
) -> dict[str, Any]:
    """McCandlish et al.'s comparison: B_crit fitted to the (steps, examples) to a
    target, against B_simple averaged over the same stretch of training.

    B_crit is fitted (``fit_critical_batch``) to every seed's points together (the
    headline) and to each seed's alone; B_simple of a seed is the mean of its
    runs' values; the ratio B_simple / B_crit is taken per seed, then summarized
    over seeds (mean and sample standard deviation, ``mean_std``).

    Args:
      points: by seed, ``(S, E)`` of each fixed batch that reached the target.
      noise_scales: by seed, B_simple of each run over the stretch up to the
        target (None: not measured, e.g. a batch of one group).

    Returns:
      A JSON-able dict: ``points`` and ``batches_reached`` (their batches);
      the pooled fit's fields (``s_min``, ``e_min``, ``b_crit``, ``rms_log_error``
      and its curve), absent when fewer than three batches reached the target (a
      seed's ``b_crit`` likewise);
      ``per_seed`` (``b_crit``, ``b_simple``, ``ratio``, each None where
      undefined); ``b_simple`` and ``b_simple_std`` over seeds; ``ratio_mean`` and
      ``ratio_std``.

    >>> out = critical_batch_vs_noise_scale(
    ...     {0: [(300.0, 3e4), (200.0, 4e4), (150.0, 6e4)]}, {0: [100.0, 140.0]})
    >>> round(out["b_crit"]), out["b_simple"], round(out["ratio_mean"], 2)
    (200, 120.0, 0.6)
    """
    per_seed: dict[str, dict[str, float | None]] = {}
    pooled: list[tuple[float, float]] = []
    for seed in sorted(set(points) | set(noise_scales)):
        mine = [(float(s), float(e)) for s, e in points.get(seed, ())]
        pooled += mine
        fit = _fit_or_none(mine)
        measured = [b for b in noise_scales.get(seed, ()) if b is not None and b > 0]
        b_simple = float(np.mean(measured)) if measured else None
        b_crit = fit.b_crit if fit is not None else None
        per_seed[str(seed)] = {
            "b_crit": b_crit,
            "b_simple": b_simple,
            "ratio": b_simple / b_crit if b_simple and b_crit else None,
        }
    b_simples = [v["b_simple"] for v in per_seed.values() if v["b_simple"]]
    ratios = [v["ratio"] for v in per_seed.values() if v["ratio"] is not None]
    out: dict[str, Any] = {
        "points": [list(p) for p in pooled],
        "batches_reached": sorted({round(e / s) for s, e in pooled}),
        "per_seed": per_seed,
        "b_simple": mean_std(b_simples)[0] if b_simples else None,
        "b_simple_std": mean_std(b_simples)[1] if b_simples else None,
        "ratio_mean": mean_std(ratios)[0] if ratios else None,
        "ratio_std": mean_std(ratios)[1] if ratios else None,
    }
    fit = _fit_or_none(pooled)
    if fit is not None:
        out.update(fit._asdict())
    return out
