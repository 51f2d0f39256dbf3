"""Tests of the demo's statistics for the critical batch: the steps (or examples)
to a target error interpolated from an error curve, and McCandlish et al.'s
steps/examples trade-off fitted to (S, E) points. References are numpy, written
here: ``np.interp`` on the crossing segment, and a grid search of the same loss."""

from __future__ import annotations

import math

import numpy as np
import pytest

from optax_warmup.demo.stats import (
    _mann_whitney_null,
    count_to_target,
    fit_critical_batch,
    shift,
)

# --- count_to_target ----------------------------------------------------------------


def test_count_to_target_interpolates_between_evaluations():
    counts, errors = [100, 200, 300, 400], [0.8, 0.5, 0.3, 0.1]
    # 0.4 lies between 0.5 (200 steps) and 0.3 (300 steps), half-way.
    assert count_to_target(counts, errors, 0.4) == pytest.approx(250.0)
    assert count_to_target(counts, errors, 0.3) == 300.0  # reached at an evaluation
    assert count_to_target(counts, errors, 0.9) == 100.0  # from the first one
    assert count_to_target(counts, errors, 0.05) is None  # never


def test_count_to_target_matches_numpy_interp_on_decreasing_curves():
    rng = np.random.default_rng(0)
    for _ in range(50):
        counts = np.cumsum(rng.integers(1, 100, 12)).astype(float)
        errors = np.sort(rng.uniform(0.01, 0.9, 12))[::-1]
        target = rng.uniform(errors[-1], errors[0])
        expected = np.interp(target, errors[::-1], counts[::-1])
        got = count_to_target(counts.tolist(), errors.tolist(), float(target))
        assert got == pytest.approx(expected, rel=1e-12)


def test_count_to_target_takes_the_first_crossing_of_a_noisy_curve():
    # Down to 0.2 after 2 evaluations, back up, then down again: the first counts.
    counts, errors = [1, 2, 3, 4], [0.6, 0.2, 0.5, 0.1]
    assert count_to_target(counts, errors, 0.3) == pytest.approx(1.75)


def test_count_to_target_of_a_diverged_curve():
    nan = float("nan")
    assert count_to_target([1, 2, 3], [0.6, nan, nan], 0.3) is None
    # A crossing right after a non-finite error is placed at its evaluation.
    assert count_to_target([1, 2, 3], [0.6, nan, 0.2], 0.3) == 3.0


@pytest.mark.parametrize(
    "counts, errors, target, argument",
    [
        ([], [], 0.1, "counts"),
        ([1, 2], [0.5], 0.1, "errors"),
        ([2, 1], [0.5, 0.4], 0.1, "counts"),
        ([1, float("inf")], [0.5, 0.4], 0.1, "counts"),
        ([1, 2], [0.5, 0.4], float("nan"), "target"),
    ],
)
def test_count_to_target_bad_input_names_the_argument(counts, errors, target, argument):
    with pytest.raises(ValueError, match=f"^{argument} "):
        count_to_target(counts, errors, target)


# --- fit_critical_batch ----------------------------------------------------------

BATCHES = 32 * 2.0 ** np.arange(8)  # 32 ... 4096


def _points(s_min, b_crit, batches, noise=0.0, seed=0):
    """Steps and examples of McCandlish's model, S = S_min (1 + B_crit / B) and
    E = B·S, each S scattered by a factor exp(N(0, noise))."""
    rng = np.random.default_rng(seed)
    steps = s_min * (1 + b_crit / batches) * np.exp(rng.normal(0, noise, len(batches)))
    return steps, batches * steps


def test_fit_recovers_a_known_critical_batch_from_noisy_points():
    """8 batches × 3 seeds, each count off by 3% (log-normal): B_crit within 5%."""
    batches = np.repeat(BATCHES, 3)
    steps, examples = _points(250.0, 512.0, batches, noise=0.03, seed=0)
    fit = fit_critical_batch(steps, examples)
    assert fit.b_crit == pytest.approx(512.0, rel=0.05)
    assert fit.s_min == pytest.approx(250.0, rel=0.05)
    assert fit.e_min == pytest.approx(250.0 * 512.0, rel=0.05)
    assert fit.b_crit == pytest.approx(fit.e_min / fit.s_min, rel=1e-12)
    assert 0.01 < fit.rms_log_error < 0.06  # the 3% scatter, seen by the fit


def test_fit_of_exact_points_is_exact_and_its_curve_is_the_papers_hyperbola():
    steps, examples = _points(100.0, 300.0, BATCHES)
    fit = fit_critical_batch(list(steps), list(examples), curve_points=33)
    assert fit.s_min == pytest.approx(100.0, rel=1e-6)
    assert fit.e_min == pytest.approx(30_000.0, rel=1e-6)
    assert fit.rms_log_error < 1e-6
    s, e, b = (np.asarray(v) for v in (fit.steps, fit.examples, fit.batches))
    assert len(b) == 33 and b[0] == pytest.approx(32 / 4) and b[-1] == 4096 * 4
    np.testing.assert_allclose(e, b * s, rtol=1e-12)
    hyperbola = (s / fit.s_min - 1) * (e / fit.e_min - 1)  # the paper's trade-off: = 1
    np.testing.assert_allclose(hyperbola, 1.0, rtol=1e-9)


def test_fit_is_the_least_squares_minimum_of_the_log_residuals():
    """Against a plain grid search of Σ (log S_i − log(S_min + E_min / B_i))²."""
    steps, examples = _points(80.0, 200.0, BATCHES[:6], noise=0.1, seed=3)
    batches = examples / steps

    def loss(log_s_min, log_e_min):
        model = np.exp(log_s_min)[..., None] + np.exp(log_e_min)[..., None] / batches
        return np.sum((np.log(steps) - np.log(model)) ** 2, axis=-1)

    center, width = np.log([80.0, 16_000.0]), 1.0
    for _ in range(6):  # zoom in around the grid's best point
        grid = np.linspace(-width, width, 81)
        a, b = np.meshgrid(center[0] + grid, center[1] + grid, indexing="ij")
        values = loss(a, b)
        i, j = np.unravel_index(np.argmin(values), values.shape)
        center, width = np.array([a[i, j], b[i, j]]), width / 8
    fit = fit_critical_batch(steps, examples)
    got = loss(np.log(fit.s_min), np.log(fit.e_min))
    assert got <= values.min() + 1e-9
    np.testing.assert_allclose(np.log([fit.s_min, fit.e_min]), center, atol=1e-3)
    # Steps or examples: the same log residuals (E = B·S), the same fit.
    rms = math.sqrt(
        np.mean((np.log(examples) - np.log(batches * fit.s_min + fit.e_min)) ** 2)
    )
    assert rms == pytest.approx(fit.rms_log_error, rel=1e-9)


def test_fit_scales_with_the_counts_and_keeps_the_critical_batch():
    steps, examples = _points(50.0, 700.0, BATCHES, noise=0.05, seed=1)
    fit = fit_critical_batch(steps, examples)
    scaled = fit_critical_batch(3 * steps, 3 * examples)  # a 3× longer target
    assert scaled.s_min == pytest.approx(3 * fit.s_min, rel=1e-6)
    assert scaled.b_crit == pytest.approx(fit.b_crit, rel=1e-6)


def test_two_points_fit_exactly():
    fit = fit_critical_batch([300.0, 150.0], [3e4, 6e4])  # B = 100, 400
    assert (fit.s_min, fit.e_min) == pytest.approx((100.0, 2e4), rel=1e-6)


def test_perfect_scaling_puts_the_critical_batch_beyond_the_batches():
    steps = 1e5 / BATCHES  # S ∝ 1/B: no diminishing return measured
    fit = fit_critical_batch(steps, BATCHES * steps)
    assert fit.b_crit > 1000 * BATCHES.max()
    assert math.isfinite(fit.b_crit)


@pytest.mark.parametrize(
    "steps, examples, argument",
    [
        ([100.0], [3200.0], "steps"),
        ([], [], "steps"),
        ([100.0, 0.0], [3200.0, 6400.0], "steps"),
        ([100.0, -5.0], [3200.0, 6400.0], "steps"),
        ([100.0, float("nan")], [3200.0, 6400.0], "steps"),
        ([100.0, 50.0], [3200.0, 0.0], "examples"),
        ([100.0, 50.0], [3200.0, float("inf")], "examples"),
        ([100.0, 50.0], [3200.0], "examples"),
        ([100.0, 50.0, 40.0], [3200.0, 6400.0], "examples"),
        ([100.0, 50.0], [3200.0, 1600.0], "examples / steps"),  # one batch, 32
    ],
)
def test_fit_bad_input_names_the_argument(steps, examples, argument):
    with pytest.raises(ValueError, match=f"^{argument} "):
        fit_critical_batch(steps, examples)


def test_fit_refuses_a_curve_of_fewer_than_two_points():
    with pytest.raises(ValueError, match=r"^curve_points "):
        fit_critical_batch([100.0, 50.0], [3200.0, 6400.0], curve_points=1)


# --- the shift of one sample over another --------------------------------------------


def _exact_p(a, b):
    from scipy import stats as scipy_stats

    return scipy_stats.mannwhitneyu(a, b, method="exact").pvalue


@pytest.mark.parametrize("m,n", [(1, 1), (3, 3), (5, 5), (6, 6), (4, 7), (9, 2)])
def test_shift_p_value_is_scipys_exact_mann_whitney(m, n):
    rng = np.random.default_rng(m * 10 + n)
    for _ in range(5):
        a, b = rng.normal(size=m), rng.normal(size=n) + 0.7
        assert shift(a, b).p_value == pytest.approx(_exact_p(a, b), rel=1e-12)


def test_shift_null_counts_every_ordering_once():
    for m, n in [(1, 4), (3, 3), (6, 6), (5, 8)]:
        counts = _mann_whitney_null(m, n)
        assert len(counts) == m * n + 1
        assert sum(counts) == math.comb(m + n, m)
        assert counts == counts[::-1]  # U and mn − U are equally likely


def test_shift_interval_is_the_order_statistics_of_the_differences():
    a, b = [1.2, 1.3, 1.0, 1.5, 1.1], [0.8, 0.7, 0.9, 0.75, 0.85]
    d = np.sort(np.subtract.outer(a, b).ravel())
    r = shift(a, b, confidence=0.9)
    # 5 against 5: P(U ≤ 4) = 12/252 ≤ 0.05 < P(U ≤ 5) = 19/252, so k = 5.
    assert (r.low, r.high) == (d[4], d[20])
    assert r.coverage == pytest.approx(1 - 2 * 12 / 252)
    assert r.estimate == np.median(d)
    wider = shift(a, b, confidence=0.99)
    assert wider.low < r.low and wider.high > r.high


def test_shift_interval_covers_a_heavy_tailed_shift_as_promised():
    # Distribution-free: a Cauchy noise (diverging seeds, say) keeps the coverage.
    rng = np.random.default_rng(0)
    trials, true_shift = 2000, 0.3
    covered = 0
    for _ in range(trials):
        a = rng.standard_cauchy(6) + true_shift
        b = rng.standard_cauchy(6)
        r = shift(a, b)
        covered += r.low <= true_shift <= r.high
    coverage = shift(np.zeros(6) + 1, np.arange(6.0)).coverage
    assert coverage == pytest.approx(1 - 2 * 43 / 924)  # P(U ≤ 7) for 6 and 6
    assert abs(covered / trials - coverage) < 3 * math.sqrt(0.1 * 0.9 / trials)


def test_one_far_seed_moves_the_interval_with_5_seeds_but_not_with_6():
    # How far one bad seed lands moves an end of the interval when that end is
    # one of its differences: with 5 seeds a side at 90% (k = 5, the upper end
    # d_(21) of 25) it is; with 6 (k = 8, d_(29) of 36) its 6 differences are
    # the 6 largest and both ends are other seeds' differences.
    ref = [0.70, 0.72, 0.74, 0.76, 0.78, 0.80]
    good = [0.80, 0.82, 0.84, 0.86, 0.88]
    six = [shift([*good, far], ref) for far in (1.5, 5.0)]
    assert six[0][1:] == six[1][1:]  # the interval, its coverage and p
    five = [shift([*good[:4], far], ref[:5]) for far in (1.5, 5.0)]
    assert five[1].high > five[0].high


def test_shift_too_few_seeds_gives_the_infinite_interval():
    r = shift([1.0, 2.0], [0.0, 0.5])  # the most extreme ordering: 1/6 > 0.05
    assert (r.low, r.high, r.coverage) == (-math.inf, math.inf, 1.0)
    assert r.estimate == pytest.approx(1.25)
    assert r.p_value == pytest.approx(1 / 3)


def test_shift_ties_count_one_half():
    r = shift([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    assert r.estimate == 0.0 and r.p_value == 1.0
    assert shift([0.2, 0.2, 0.2], [0.1, 0.1, 0.1]).p_value == pytest.approx(0.1)


@pytest.mark.parametrize(
    "a,b,kwargs,argument",
    [
        ([], [1.0], {}, "a"),
        ([1.0], [math.nan], {}, "b"),
        ([[1.0, 2.0]], [1.0], {}, "a"),
        ([1.0], [2.0], {"confidence": 1.0}, "confidence"),
        ([1.0], [2.0], {"confidence": 0}, "confidence"),
    ],
)
def test_shift_bad_input_names_the_argument(a, b, kwargs, argument):
    with pytest.raises(ValueError, match=f"^{argument} "):
        shift(a, b, **kwargs)


def test_shift_p_value_of_far_apart_samples_is_tiny_not_negative():
    a, b = np.arange(30.0) + 100, np.arange(30.0)
    p = shift(a, b).p_value
    assert p > 0 and p == pytest.approx(_exact_p(a, b), rel=1e-9)
    assert shift(b, a).p_value == pytest.approx(p, rel=1e-9)
