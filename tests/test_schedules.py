"""Tests of the warmup schedules against plain numpy references and optax."""

import math

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import optax_warmup as ow

STEPS = np.arange(0, 40)
SHAPES = ["linear", "constant", "exponential", "cosine", "1-sqrt"]


def values(schedule, steps=STEPS):
    return np.array([float(schedule(int(t))) for t in steps])


# Plain references, written from the formulas of the papers and the seed.


def ref_warmup(after, w, init, shape, time, t):
    peak = after(0) if time == "relative" else after(w)
    if t >= w:
        return after(t - w) if time == "relative" else after(t)
    f = t / w
    if shape == "linear":
        return init + (peak - init) * f
    if shape == "cosine":
        return init + (peak - init) * (1 - math.cos(math.pi * f)) / 2
    if shape == "exponential":
        return init * math.exp(f * math.log(peak / init))
    if shape == "1-sqrt":
        return init + (peak - init) * (1 - math.sqrt(1 - f))
    return init


def ref_goyal(
    t, batch, spe, base_lr, base_batch, warmup_epochs, milestones, decay, kind
):
    peak = base_lr * batch / base_batch
    w = 0 if kind == "none" else round(warmup_epochs * spe)
    if t < w:
        return base_lr if kind == "constant" else base_lr + (peak - base_lr) * t / w
    return peak * decay ** sum(t >= m * spe for m in milestones)


def decaying(t):
    return 2.0 * 0.9 ** (t / 7.0)


# linear_scaling_rule


def test_linear_scaling_rule_values():
    assert ow.linear_scaling_rule(0.1, 8192) == pytest.approx(3.2)
    assert ow.linear_scaling_rule(0.1, 256) == pytest.approx(0.1)
    assert ow.linear_scaling_rule(0.2, 64, base_batch_size=32) == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"base_lr": -0.1, "batch_size": 256}, "base_lr"),
        ({"base_lr": math.nan, "batch_size": 256}, "base_lr"),
        ({"base_lr": math.inf, "batch_size": 256}, "base_lr"),
        ({"base_lr": 0.1, "batch_size": 0}, "batch_size"),
        ({"base_lr": 0.1, "batch_size": 256, "base_batch_size": -1}, "base_batch_size"),
    ],
)
def test_linear_scaling_rule_rejects(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ow.linear_scaling_rule(**kwargs)


# warmup_schedule: values


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("time", ["relative", "absolute"])
def test_warmup_schedule_matches_reference(shape, time):
    schedule = ow.warmup_schedule(decaying, 10, init_value=0.05, shape=shape, time=time)
    expected = [ref_warmup(decaying, 10, 0.05, shape, time, t) for t in STEPS]
    np.testing.assert_allclose(values(schedule), expected, rtol=1e-6)


def test_warmup_schedule_constant_after():
    schedule = ow.warmup_schedule(0.4, 4)
    np.testing.assert_allclose(values(schedule, range(6)), [0, 0.1, 0.2, 0.3, 0.4, 0.4])


def test_warmup_schedule_matches_optax_warmup_cosine_decay():
    w, total, peak = 20, 100, 0.7
    ours = ow.warmup_schedule(
        optax.cosine_decay_schedule(peak, decay_steps=total - w, alpha=0.1), w
    )
    theirs = optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup_steps=w, decay_steps=total, end_value=0.07
    )
    steps = np.arange(0, 130)
    np.testing.assert_allclose(values(ours, steps), values(theirs, steps), rtol=1e-5)


def test_warmup_schedule_matches_optax_join_schedules():
    after = optax.exponential_decay(1.0, transition_steps=5, decay_rate=0.5)
    ours = ow.warmup_schedule(after, 8, init_value=0.2)
    theirs = optax.join_schedules(
        [optax.linear_schedule(0.2, 1.0, transition_steps=8), after], boundaries=[8]
    )
    np.testing.assert_allclose(values(ours), values(theirs), rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("time", ["relative", "absolute"])
def test_zero_warmup_steps_is_exactly_after(shape, time):
    schedule = ow.warmup_schedule(decaying, 0, init_value=0.3, shape=shape, time=time)
    np.testing.assert_array_equal(
        values(schedule), [float(decaying(jnp.float32(t))) for t in STEPS]
    )


def test_constant_shape_holds_then_jumps():
    schedule = ow.warmup_schedule(1.0, 5, init_value=0.1, shape="constant")
    np.testing.assert_allclose(values(schedule, range(8)), [0.1] * 5 + [1.0] * 3)


def test_absolute_time_keeps_milestones_in_place():
    after = optax.piecewise_constant_schedule(1.0, {30: 0.1})
    relative = ow.warmup_schedule(after, 10, time="relative")
    absolute = ow.warmup_schedule(after, 10, time="absolute")
    assert float(absolute(29)) == 1.0 and float(absolute(30)) == pytest.approx(0.1)
    assert float(relative(39)) == 1.0 and float(relative(40)) == pytest.approx(0.1)


def test_negative_steps_are_step_zero():
    schedule = ow.warmup_schedule(decaying, 10, init_value=0.1)
    assert float(schedule(-5)) == float(schedule(0))


# warmup_schedule: the JAX contract


def rsqrt_after(scale):
    # NaN for steps below -1: evaluating it at t - W < -1 would poison gradients.
    return lambda s: scale * jax.lax.rsqrt(1.0 + s)


@pytest.mark.parametrize("time", ["relative", "absolute"])
@pytest.mark.parametrize("shape", SHAPES)
def test_grad_wrt_hyperparameters_is_finite(time, shape):
    def lr(scale, init, t):
        schedule = ow.warmup_schedule(
            rsqrt_after(scale), 10, init_value=init, shape=shape, time=time
        )
        return schedule(t)

    grad = jax.vmap(jax.grad(lr, argnums=(0, 1)), in_axes=(None, None, 0))
    d_scale, d_init = grad(2.0, 0.5, jnp.arange(30))
    assert np.all(np.isfinite(d_scale)) and np.all(np.isfinite(d_init))
    assert float(d_scale[29]) > 0.0


def test_values_are_finite_with_a_nan_prone_after():
    schedule = ow.warmup_schedule(rsqrt_after(1.0), 10)
    assert np.all(np.isfinite(values(schedule)))


def test_jit_and_vmap_over_steps_equal_eager():
    schedule = ow.warmup_schedule(decaying, 10, init_value=0.1, shape="cosine")
    eager = values(schedule)
    jitted = jax.jit(schedule)
    # XLA may fuse differently from op-by-op eager execution: equal to 1 ulp.
    jit_values = np.float32([jitted(int(t)) for t in STEPS])
    np.testing.assert_array_max_ulp(jit_values, np.float32(eager), maxulp=1)
    vmap_values = jax.vmap(schedule)(jnp.asarray(STEPS))
    np.testing.assert_array_max_ulp(vmap_values, np.float32(eager), maxulp=1)


def test_int32_steps_never_retrace():
    schedule = ow.goyal_schedule(1024, 10)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def lr(step):
        return schedule(step)

    for t in range(0, 1000, 97):
        lr(jnp.int32(t))


def test_vmap_over_hyperparameters():
    steps = jnp.arange(12)
    inits = jnp.array([0.0, 0.1, 0.2])
    peaks = jnp.array([1.0, 2.0])
    widths = jnp.array([0, 4, 8])

    by_init = jax.vmap(
        lambda i: jax.vmap(ow.warmup_schedule(1.0, 8, init_value=i))(steps)
    )
    for row, init in zip(by_init(inits), inits, strict=True):
        ref = [
            ref_warmup(lambda t: 1.0, 8, float(init), "linear", "relative", t)
            for t in steps
        ]
        np.testing.assert_allclose(row, ref, rtol=1e-6)

    by_peak = jax.vmap(lambda p: jax.vmap(ow.warmup_schedule(p, 8))(steps))
    for row, peak in zip(by_peak(peaks), peaks, strict=True):
        ref = [
            ref_warmup(lambda t, p=float(peak): p, 8, 0.0, "linear", "relative", t)
            for t in steps
        ]
        np.testing.assert_allclose(row, ref, rtol=1e-6)

    by_width = jax.vmap(lambda w: jax.vmap(ow.warmup_schedule(1.0, w))(steps))
    for row, w in zip(by_width(widths), widths, strict=True):
        ref = [
            1.0
            if int(w) == 0
            else ref_warmup(lambda t: 1.0, int(w), 0.0, "linear", "relative", t)
            for t in steps
        ]
        np.testing.assert_allclose(row, ref, rtol=1e-6)


STEP_DTYPES = [jnp.int32, jnp.uint32, jnp.float32, np.int64, int]


@pytest.mark.parametrize("dtype", STEP_DTYPES)
def test_step_dtypes_agree(dtype):
    schedule = ow.goyal_schedule(2048, 7, warmup_epochs=2, milestones=(3, 5))
    expected = values(schedule, range(50))
    got = [float(schedule(dtype(t))) for t in range(50)]
    np.testing.assert_array_equal(got, expected)


def test_int64_steps_with_x64():
    schedule = ow.goyal_schedule(2048, 7, warmup_epochs=2, milestones=(3, 5))
    expected = values(schedule, range(50))
    with jax.enable_x64(True):
        steps = jnp.arange(50, dtype=jnp.int64)
        assert steps.dtype == jnp.int64
        got = jax.vmap(schedule)(steps)
        assert got.dtype == jnp.float32
    np.testing.assert_array_max_ulp(got, np.float32(expected), maxulp=1)


def test_uint32_step_where_optax_piecewise_fails():
    # optax's piecewise_constant_schedule misreads uint32 steps (nnx.Optimizer.step).
    schedule = ow.goyal_schedule(512, 10, warmup="none", milestones=(1,))
    assert float(schedule(jnp.uint32(20))) == pytest.approx(0.02)


def test_strict_dtype_promotion():
    schedules = [
        ow.goyal_schedule(1024, 10),
        ow.warmup_schedule(decaying, 5, init_value=0.1, shape="exponential"),
        ow.gradual_warmup_schedule(0.1, 4, 10),
        ow.untuned_warmup_schedule(0.99, "exponential"),
    ]
    with jax.numpy_dtype_promotion("strict"):
        for schedule in schedules:
            for step in (jnp.uint32(3), jnp.int32(30), jnp.float32(300.0)):
                assert schedule(step).dtype == jnp.float32


def test_giant_step_gives_final_value():
    schedule = ow.goyal_schedule(8192, 156)
    last = schedule(jnp.int32(2**31 - 1))
    assert last.dtype == jnp.float32 and math.isfinite(float(last))
    assert float(last) == pytest.approx(3.2e-3, rel=1e-6)
    assert float(schedule(jnp.uint32(2**32 - 1))) == pytest.approx(3.2e-3, rel=1e-6)


# warmup_schedule: properties


@settings(max_examples=50, deadline=None)
@given(
    init=st.floats(0.001, 1.0),
    peak=st.floats(0.001, 10.0),
    w=st.integers(1, 300),
    shape=st.sampled_from(["linear", "cosine", "exponential", "1-sqrt"]),
)
def test_warmup_is_monotone_bounded_and_continuous(init, peak, w, shape):
    schedule = ow.warmup_schedule(peak, w, init_value=init, shape=shape)
    # Steps 0..w, evaluated as one array of a fixed length (that of the largest w):
    # every example then reuses the operations compiled for the first.
    v = np.asarray(jax.vmap(schedule)(jnp.arange(301)), np.float64)[: w + 1]
    lo, hi = min(init, peak), max(init, peak)
    tol = 1e-6 * hi
    assert np.all(v >= lo - tol) and np.all(v <= hi + tol)
    steps = np.diff(v[: w + 1])
    assert np.all(steps >= -tol) if peak >= init else np.all(steps <= tol)
    assert v[0] == pytest.approx(init, rel=1e-6)
    assert v[w] == pytest.approx(peak, rel=1e-6)  # the hand-off
    # Continuity: the hand-off jump is no larger than the steepest step of the shape.
    slope = max(abs(peak - init) * math.pi / 2, peak * abs(math.log(peak / init)))
    # 1 - sqrt(1 - f) has an infinite slope at f = 1: its last step is sqrt(1/w).
    bound = abs(peak - init) / math.sqrt(w) if shape == "1-sqrt" else slope / w
    assert abs(v[w] - v[w - 1]) <= bound + tol


# warmup_schedule: bad input


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"warmup_steps": 5, "shape": "quadratic"}, "shape"),
        ({"warmup_steps": 5, "time": "later"}, "time"),
        ({"warmup_steps": 5, "init_value": -0.1}, "init_value"),
        ({"warmup_steps": 5, "init_value": math.nan}, "init_value"),
        ({"warmup_steps": 5, "shape": "exponential"}, "init_value"),
        ({"warmup_steps": 5, "after": math.inf}, "after"),
        ({"warmup_steps": 5, "after": -1.0}, "after"),
    ],
)
def test_warmup_schedule_rejects(kwargs, name):
    kwargs = {"after": 1.0, **kwargs}
    with pytest.raises(ValueError, match=name):
        ow.warmup_schedule(**kwargs)


# gradual_warmup_schedule (the seed's GradualWarmupScheduler)


def ref_gradual(base_lr, m, total, t, after=None):
    if t < total:
        if m == 1:
            return base_lr * t / total
        return base_lr * ((m - 1) * t / total + 1)
    return after(t - total) if after else base_lr * m


@pytest.mark.parametrize("multiplier", [1.0, 2.0, 8.0])
def test_gradual_warmup_matches_seed_formula(multiplier):
    schedule = ow.gradual_warmup_schedule(0.1, multiplier, 10)
    expected = [ref_gradual(0.1, multiplier, 10, t) for t in STEPS]
    np.testing.assert_allclose(values(schedule), expected, rtol=1e-6)


def test_gradual_warmup_hands_off_to_after_at_step_zero():
    after = optax.cosine_decay_schedule(0.8, decay_steps=20)
    schedule = ow.gradual_warmup_schedule(0.1, 8, 10, after=after)
    expected = [ref_gradual(0.1, 8, 10, t, lambda s: float(after(s))) for t in STEPS]
    np.testing.assert_allclose(values(schedule), expected, rtol=1e-6)
    # The first step after warmup is after(0): not the stale peak, not one step late.
    assert float(schedule(10)) == float(after(0))
    assert float(schedule(11)) == float(after(1))


def test_gradual_warmup_is_path_independent():
    # A resumed run (a fresh schedule evaluated from step k on) sees the same rates as
    # an uninterrupted run, in any order.
    after = optax.exponential_decay(0.4, 3, 0.5)
    uninterrupted = values(ow.gradual_warmup_schedule(0.1, 4, 12, after))
    resumed = ow.gradual_warmup_schedule(0.1, 4, 12, after)
    order = np.random.default_rng(0).permutation(STEPS)
    got = dict(zip(order, values(resumed, order), strict=True))
    np.testing.assert_array_equal([got[t] for t in STEPS], uninterrupted)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"multiplier": 0.5}, "multiplier"),
        ({"multiplier": math.nan}, "multiplier"),
        ({"base_lr": -1.0}, "base_lr"),
        ({"warmup_steps": -3}, "warmup_steps"),
    ],
)
def test_gradual_warmup_rejects(kwargs, name):
    kwargs = {"base_lr": 0.1, "multiplier": 2.0, "warmup_steps": 5, **kwargs}
    with pytest.raises(ValueError, match=name):
        ow.gradual_warmup_schedule(**kwargs)


# goyal_schedule


def test_goyal_schedule_headline_values():
    schedule = ow.goyal_schedule(8192, 156)
    assert float(schedule(0)) == pytest.approx(0.1)
    assert float(schedule(5 * 156)) == pytest.approx(3.2)


@pytest.mark.parametrize("warmup", ["gradual", "constant", "none"])
def test_goyal_schedule_matches_reference(warmup):
    kwargs = {"warmup_epochs": 2.5, "milestones": (4, 6, 8), "decay_factor": 0.2}
    schedule = ow.goyal_schedule(4096, 8, base_lr=0.05, warmup=warmup, **kwargs)
    steps = np.arange(0, 80)
    expected = [
        ref_goyal(t, 4096, 8, 0.05, 256, 2.5, (4, 6, 8), 0.2, warmup) for t in steps
    ]
    np.testing.assert_allclose(values(schedule, steps), expected, rtol=1e-6)


@pytest.mark.parametrize("warmup", ["gradual", "constant"])
def test_goyal_schedule_below_the_base_batch_never_warms_down(warmup):
    # k = 64 / 256 < 1: the linearly scaled rate 0.025 from the first step on (a
    # warmup from base_lr = 0.1 down to it would run the first steps at 4x).
    schedule = ow.goyal_schedule(64, 100, warmup=warmup)
    steps = [0, 1, 250, 499, 500, 2999, 3000, 6000, 8000]
    expected = [0.025] * 6 + [0.0025, 0.00025, 0.000025]
    np.testing.assert_allclose(values(schedule, steps), expected, rtol=1e-6)
    # At k = 1 the warmup is flat at base_lr; above it, it starts at base_lr.
    same = ow.goyal_schedule(256, 100, warmup=warmup)
    np.testing.assert_allclose(values(same, [0, 250, 500]), [0.1] * 3, rtol=1e-6)
    np.testing.assert_allclose(
        values(ow.goyal_schedule(512, 100, warmup=warmup), [0]), [0.1], rtol=1e-6
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"steps_per_epoch": 0}, "steps_per_epoch"),
        ({"steps_per_epoch": 1.5}, "steps_per_epoch"),
        ({"base_lr": math.nan}, "base_lr"),
        ({"base_lr": -0.1}, "base_lr"),
        ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"milestones": (60, 30)}, "milestones"),
        ({"milestones": (3, 30)}, "milestones"),
        ({"decay_factor": 0.0}, "decay_factor"),
        ({"decay_factor": math.nan}, "decay_factor"),
        ({"warmup": "linear"}, "warmup"),
    ],
)
def test_goyal_schedule_rejects(kwargs, name):
    kwargs = {"batch_size": 8192, "steps_per_epoch": 156, **kwargs}
    with pytest.raises(ValueError, match=name):
        ow.goyal_schedule(**kwargs)


# untuned_warmup_schedule


@pytest.mark.parametrize("b2", [0.99, 0.999])
def test_untuned_warmup_matches_ma_and_yarats(b2):
    steps = np.arange(0, 3000, 37)
    linear = values(ow.untuned_warmup_schedule(b2, "linear"), steps)
    exponential = values(ow.untuned_warmup_schedule(b2, "exponential"), steps)
    np.testing.assert_allclose(linear, np.minimum(1, (steps + 1) * (1 - b2) / 2), 1e-6)
    np.testing.assert_allclose(exponential, 1 - np.exp(-(steps + 1) * (1 - b2)), 1e-5)


@pytest.mark.parametrize("b2", [0.0, 1.0, -0.5, math.nan])
def test_untuned_warmup_rejects_b2(b2):
    with pytest.raises(ValueError, match="b2"):
        ow.untuned_warmup_schedule(b2)


def test_untuned_warmup_rejects_shape():
    with pytest.raises(ValueError, match="shape"):
        ow.untuned_warmup_schedule(0.999, "cosine")


# The shapes: one definition for the Literal types, the checks and the table.


def test_shape_table_and_literals_agree():
    import typing

    from optax_warmup import _schedule_parts as parts

    assert typing.get_args(parts.WarmupShape) == parts.WARMUP_SHAPES
    assert typing.get_args(parts.DecayShape) == parts.DECAY_SHAPES
    assert set(parts.RAMPS) == set(parts.WARMUP_SHAPES) | set(parts.DECAY_SHAPES)
    for shape in ("triangle", "sqrt"):
        with pytest.raises(ValueError, match="warmup_shape"):
            ow.wsd_schedule(
                1.0, warmup_steps=1, stable_steps=1, decay_steps=1, warmup_shape=shape
            )
        with pytest.raises(ValueError, match="decay_shape"):
            ow.wsd_schedule(
                1.0, warmup_steps=1, stable_steps=1, decay_steps=1, decay_shape=shape
            )


# step_decay_schedule


def ref_step_decay(t, init, boundaries, factors):
    value = init
    for b, f in zip(boundaries, factors, strict=True):
        if t >= b:
            value *= f
    return value


@pytest.mark.parametrize(
    ("boundaries", "factor"),
    [((), 0.1), ((5,), 0.5), ((3, 10, 25), 0.1), ((0, 7.5, 20), (0.5, 0.2, 0.0))],
)
def test_step_decay_matches_reference(boundaries, factor):
    schedule = ow.step_decay_schedule(2.0, boundaries, factor)
    factors = factor if isinstance(factor, tuple) else (factor,) * len(boundaries)
    expected = [ref_step_decay(t, 2.0, boundaries, factors) for t in STEPS]
    np.testing.assert_allclose(values(schedule), expected, rtol=1e-6)


@pytest.mark.parametrize("dtype", STEP_DTYPES)
def test_step_decay_step_dtypes_and_optax_twin(dtype):
    schedule = ow.step_decay_schedule(1.0, [10, 20])
    twin = optax.piecewise_constant_schedule(1.0, {10: 0.1, 20: 0.1})
    for t in range(0, 40, 3):
        assert float(schedule(dtype(t))) == pytest.approx(float(twin(t)), rel=1e-6)
    # optax's own gives the undecayed value for the uint32 step of nnx.Optimizer.
    assert float(schedule(jnp.uint32(25))) == pytest.approx(0.01, rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"init_value": -1.0, "boundaries": [1]}, "init_value"),
        ({"init_value": 1.0, "boundaries": [5, 3]}, "boundaries"),
        ({"init_value": 1.0, "boundaries": [-1]}, "boundaries"),
        ({"init_value": 1.0, "boundaries": [1, 2], "factor": (0.1,)}, "factor"),
        ({"init_value": 1.0, "boundaries": [1], "factor": math.nan}, "factor"),
        ({"init_value": 1.0, "boundaries": [1], "factor": -0.5}, "factor"),
    ],
)
def test_step_decay_rejects(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ow.step_decay_schedule(**kwargs)


# wsd_schedule: against an independent reference of HF transformers' formulas


def ref_hf_wsd(t, w, s, d, warmup_type, decay_type, min_lr_ratio):
    """HF transformers' _get_wsd_scheduler_lambda (with warmup_type), in float64."""
    if t < w:
        progress = t / max(1, w)
        factor = {
            "linear": progress,
            "cosine": 0.5 * (1.0 - math.cos(math.pi * progress)),
            "1-sqrt": 1.0 - math.sqrt(1.0 - progress),
        }[warmup_type]
        return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
    if t < w + s:
        return 1.0
    if t < w + s + d:
        progress = (t - w - s) / max(1, d)
        factor = {
            "linear": 1.0 - progress,
            "cosine": 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)),
            "1-sqrt": 1.0 - math.sqrt(progress),
        }[decay_type]
        return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
    return min_lr_ratio


@pytest.mark.parametrize("decay_shape", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("warmup_shape", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("end_value", [0.0, 0.3])
def test_wsd_matches_hf_transformers(warmup_shape, decay_shape, end_value):
    peak, w, s, d = 2.0, 7, 13, 11
    schedule = ow.wsd_schedule(
        peak,
        warmup_steps=w,
        stable_steps=s,
        decay_steps=d,
        init_value=end_value,  # HF's warmup starts at min_lr_ratio * peak
        end_value=end_value,
        warmup_shape=warmup_shape,
        decay_shape=decay_shape,
    )
    ratio = end_value / peak
    steps = range(0, 40)
    expected = [
        peak * ref_hf_wsd(t, w, s, d, warmup_shape, decay_shape, ratio) for t in steps
    ]
    np.testing.assert_allclose(values(schedule, steps), expected, rtol=1e-6, atol=1e-7)


def test_wsd_phases_and_edges():
    schedule = ow.wsd_schedule(1.0, warmup_steps=4, stable_steps=6, decay_steps=4)
    v = values(schedule, range(20))
    np.testing.assert_allclose(v[:4], [0, 0.25, 0.5, 0.75], rtol=1e-6)
    np.testing.assert_allclose(v[4:10], 1.0)
    np.testing.assert_allclose(
        v[10:14], [1 - math.sqrt(p) for p in (0, 0.25, 0.5, 0.75)], rtol=1e-6
    )
    np.testing.assert_allclose(v[14:], 0.0)
    # Zero-length phases are skipped; D = 0 jumps to the end value.
    jump = ow.wsd_schedule(
        1.0, warmup_steps=0, stable_steps=3, decay_steps=0, end_value=0.1
    )
    np.testing.assert_allclose(
        values(jump, range(6)), [1, 1, 1, 0.1, 0.1, 0.1], rtol=1e-6
    )
    only_decay = ow.wsd_schedule(
        1.0, warmup_steps=0, stable_steps=0, decay_steps=4, decay_shape="linear"
    )
    np.testing.assert_allclose(values(only_decay, range(6)), [1, 0.75, 0.5, 0.25, 0, 0])
    expo = ow.wsd_schedule(
        1.0,
        warmup_steps=0,
        stable_steps=0,
        decay_steps=2,
        end_value=0.01,
        decay_shape="exponential",
    )
    np.testing.assert_allclose(values(expo, range(4)), [1, 0.1, 0.01, 0.01], rtol=1e-5)
    assert float(schedule(-5)) == 0.0 and float(schedule(jnp.uint32(2**32 - 1))) == 0


@pytest.mark.slow  # 45 eager calls per step dtype, and three vmapped sweeps
def test_wsd_contract_jit_vmap_dtypes_and_grad():
    def make(peak=1.0, w=8, s=20, d=10):
        return ow.wsd_schedule(
            peak, warmup_steps=w, stable_steps=s, decay_steps=d, end_value=0.1 * peak
        )

    schedule = make()
    steps = jnp.arange(45)
    eager = values(schedule, range(45))
    np.testing.assert_allclose(jax.jit(jax.vmap(schedule))(steps), eager, rtol=1e-6)
    for dtype in STEP_DTYPES:
        got = [float(schedule(dtype(t))) for t in range(45)]
        np.testing.assert_array_equal(got, eager)
    with jax.numpy_dtype_promotion("strict"):
        assert schedule(jnp.uint32(30)).dtype == jnp.float32
    # vmap over the peak and over the lengths: a sweep in one program.
    peaks = jnp.array([0.5, 1.0, 2.0])
    by_peak = jax.vmap(lambda p: jax.vmap(make(peak=p))(steps))(peaks)
    for row, p in zip(by_peak, peaks, strict=True):
        np.testing.assert_allclose(row, values(make(float(p)), range(45)), rtol=1e-6)
    lengths = jnp.array([0, 5, 9])
    by_w = jax.vmap(lambda w: jax.vmap(make(w=w, s=30 - w))(steps))(lengths)
    for row, w in zip(by_w, lengths, strict=True):
        ref = values(make(w=int(w), s=30 - int(w)), range(45))
        np.testing.assert_allclose(row, ref, rtol=1e-6)
    # Gradients with respect to the peak stay finite everywhere, phases included.
    grads = jax.vmap(jax.grad(lambda p, t: make(peak=p)(t)), in_axes=(None, 0))(
        1.0, steps
    )
    assert np.all(np.isfinite(grads))
    np.testing.assert_allclose(grads[8:28], 1.0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"peak_value": -1.0}, "peak_value"),
        ({"peak_value": math.nan}, "peak_value"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"stable_steps": 2.5}, "stable_steps"),
        ({"decay_steps": -3}, "decay_steps"),
        ({"init_value": -0.1}, "init_value"),
        ({"end_value": 2.0}, "end_value"),
        ({"end_value": 0.0, "decay_shape": "exponential"}, "end_value"),
        ({"init_value": 0.0, "warmup_shape": "exponential"}, "init_value"),
    ],
)
def test_wsd_rejects(kwargs, name):
    args = dict(peak_value=1.0, warmup_steps=2, stable_steps=3, decay_steps=4)
    with pytest.raises(ValueError, match=name):
        ow.wsd_schedule(**{**args, **kwargs})


def test_wsd_linear_equals_optax_join_schedules():
    ours = ow.wsd_schedule(
        1.0, warmup_steps=10, stable_steps=80, decay_steps=10, decay_shape="linear"
    )
    theirs = optax.join_schedules(
        [
            optax.linear_schedule(0.0, 1.0, 10),
            optax.constant_schedule(1.0),
            optax.linear_schedule(1.0, 0.0, 10),
            optax.constant_schedule(0.0),
        ],
        [10, 90, 100],
    )
    for t in range(0, 110, 7):
        assert float(ours(t)) == pytest.approx(float(theirs(t)), abs=1e-6)
