"""Batch-size schedules: Megatron-LM's ramp (exact arithmetic), step schedules, the
JAX contract (jit, dtypes, no retrace, the int32 range) and every named error."""

import fractions

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import optax_warmup as ow


def megatron_exact(start, increment, samples, final, consumed):
    """``RampupBatchsizeNumMicroBatchesCalculator.update`` with its division exact."""
    if consumed > samples:
        return final
    per_increment = fractions.Fraction(samples, (final - start) // increment)
    return start + int(consumed / per_increment) * increment


def megatron_float(start, increment, samples, final, consumed):
    """The same in Python floats, as Megatron computes it."""
    if consumed > samples:
        return final
    per_increment = samples / ((final - start) // increment)
    return start + int(consumed / per_increment) * increment


def boundaries(start, increment, samples, final):
    n = (final - start) // increment
    points = {0, samples, samples + 1}
    for i in range(1, n + 1):
        edge = -(-i * samples // n)
        points |= {edge - 1, edge, edge + 1}
    return sorted(p for p in points if p >= 0)


ramps = st.tuples(
    st.integers(1, 64),  # start
    st.integers(1, 32),  # increment
    st.integers(1, 10**7),  # samples
    st.integers(1, 60),  # increments
).map(lambda t: (t[0], t[1], t[2], t[0] + t[3] * t[1]))


@settings(max_examples=200, deadline=None)
@given(ramps)
def test_ramp_equals_megatron_at_every_boundary(ramp):
    schedule = ow.rampup_batch_size(*ramp)
    for consumed in boundaries(*ramp):
        assert schedule(consumed) == megatron_exact(*ramp, consumed), consumed


def test_ramp_under_jit_equals_python_at_every_boundary():
    ramp = (30, 13, 306_568, 433)
    schedule = ow.rampup_batch_size(*ramp)
    points = boundaries(*ramp)
    expected = [megatron_exact(*ramp, c) for c in points]
    assert [schedule(c) for c in points] == expected
    got = jax.jit(schedule)(jnp.asarray(points, jnp.int32))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, expected)


def test_megatron_floats_land_one_short_where_exact_arithmetic_does_not():
    # 306568 / (306568 / 31) is 30.999... in floats: Megatron stays one increment
    # short at the end of its ramp; the exact ramp reaches the global batch.
    ramp = (30, 13, 306_568, 433)
    assert megatron_float(*ramp, 306_568) == 420
    assert ow.rampup_batch_size(*ramp)(306_568) == 433
    assert jax.jit(ow.rampup_batch_size(*ramp))(jnp.int32(306_568)) == 433


def test_ramp_values_and_batch_sizes():
    schedule = ow.rampup_batch_size(32, 32, 300, 128)
    assert [schedule(c) for c in (0, 99, 100, 199, 200, 299, 300, 301)] == [
        32,
        32,
        64,
        64,
        96,
        96,
        128,
        128,
    ]
    assert schedule.batch_sizes == (32, 64, 96, 128)
    assert "300: 128" in repr(schedule)


def test_constant_ramps_where_megatron_divides_by_zero():
    for schedule in (
        ow.rampup_batch_size(64, 16, 1000, 64),  # start == global
        ow.rampup_batch_size(16, 16, 0, 64),  # no ramp samples
    ):
        assert [schedule(c) for c in (0, 1, 10**6)] == [64, 64, 64]
        assert int(jax.jit(schedule)(jnp.int32(5))) == 64
        assert schedule.batch_sizes == (64,)


def test_python_ints_of_any_size_are_exact():
    samples = 3 * 10**20 + 7
    schedule = ow.rampup_batch_size(8, 8, samples, 32)  # 3 increments
    first = -(-samples // 3)  # ceil(S / 3)
    assert schedule(first - 1) == 8 and schedule(first) == 16
    assert schedule(samples) == 32 and schedule(10**40) == 32
    assert isinstance(schedule(first), int)


def test_boundaries_beyond_int32_are_never_reached_by_an_int32_count():
    schedule = ow.rampup_batch_size(8, 8, 3 * 2**31, 32)
    top = jnp.iinfo(jnp.int32).max
    assert int(jax.jit(schedule)(jnp.int32(top - 1))) == 8
    assert schedule(2**31) == 16  # Python: exact


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint32, jnp.int16, jnp.uint8])
def test_integer_dtypes_agree(dtype):
    schedule = ow.rampup_batch_size(4, 4, 200, 20)  # boundaries 0, 50, 100, 150, 200
    counts = np.array([0, 49, 50, 149, 150, 199, 200, 255])
    got = jax.jit(schedule)(jnp.asarray(counts, dtype))
    np.testing.assert_array_equal(got, [schedule(int(c)) for c in counts])


def test_int64_counts_with_x64():
    with jax.enable_x64(True):
        schedule = ow.rampup_batch_size(8, 8, 3 * 2**33, 32)
        count = jnp.asarray(2**33, jnp.int64)
        assert int(jax.jit(schedule)(count)) == 16


def test_vmap_and_no_retrace():
    schedule = ow.step_batch_size({0: 768, 250_000: 1536, 500_000: 3072})
    counts = jnp.asarray([0, 249_999, 250_000, 499_999, 500_000, 10**9], jnp.int32)
    np.testing.assert_array_equal(
        jax.vmap(schedule)(counts), [768, 768, 1536, 1536, 3072, 3072]
    )

    @jax.jit
    @chex.assert_max_traces(n=1)
    def batch(count):
        return schedule(count)

    for c in (0, 250_000, 10**9):
        batch(jnp.int32(c))


def test_step_schedule_sorts_its_thresholds():
    schedule = ow.step_batch_size({250_000: 1536, 0: 768})
    assert schedule(249_999) == 768 and schedule(250_000) == 1536
    assert schedule.batch_sizes == (768, 1536)
    assert ow.step_batch_size({0: 64})(10**12) == 64


def test_a_decreasing_step_schedule_is_allowed():
    schedule = ow.step_batch_size({0: 256, 100: 64})
    assert (schedule(99), schedule(100)) == (256, 64)


def test_negative_counts():
    schedule = ow.rampup_batch_size(32, 32, 300, 128)
    with pytest.raises(ValueError, match="consumed_samples must be >= 0, got -1"):
        schedule(-1)
    with pytest.raises(ValueError, match="consumed_samples must be >= 0"):
        schedule(jnp.asarray([5, -1], jnp.int32))
    # Under jit it cannot raise: batch 0, which ow.accumulate turns into NaN.
    assert int(jax.jit(schedule)(jnp.int32(-1))) == 0


@pytest.mark.parametrize("count", [1.5, jnp.float32(100.0), True, "100"])
def test_non_integer_counts_are_refused(count):
    with pytest.raises(TypeError, match="consumed_samples"):
        ow.rampup_batch_size(32, 32, 300, 128)(count)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((0, 32, 300, 128), ValueError, "start_batch_size must be an integer >= 1"),
        ((32, 0, 300, 128), ValueError, "batch_size_increment must be .*got 0"),
        ((32, 32, -1, 128), ValueError, "rampup_samples must be an integer >= 0"),
        ((32, 32, 300, 0), ValueError, "global_batch_size must be an integer >= 1"),
        ((256, 32, 300, 128), ValueError, "start_batch_size=256, global_batch_size"),
        ((32, 40, 300, 128), ValueError, "batch_size_increment=40 for a span of 96"),
        ((32.0, 32, 300, 128), TypeError, "start_batch_size must be an integer"),
        ((32, True, 300, 128), TypeError, "batch_size_increment must be an integer"),
        ((32, 32, 3e5, 128), TypeError, "rampup_samples must be an integer"),
    ],
)
def test_ramp_errors_name_the_argument(args, error, match):
    with pytest.raises(error, match=match):
        ow.rampup_batch_size(*args)


@pytest.mark.parametrize(
    ("table", "error", "match"),
    [
        ([(0, 64)], TypeError, "batch_sizes must map thresholds"),
        ({}, ValueError, "at least one entry"),
        ({100: 64}, ValueError, "must start at 0 samples"),
        ({0: 64, 100: 0}, ValueError, r"batch_sizes\[100\] must be an integer >= 1"),
        ({0: 64, -5: 32}, ValueError, "threshold -5 must be an integer >= 0"),
        ({0: 64.0}, TypeError, r"batch_sizes\[0\] must be an integer"),
        ({0: 64, "1B": 128}, TypeError, "threshold '1B' must be an integer"),
    ],
)
def test_step_errors_name_the_entry(table, error, match):
    with pytest.raises(error, match=match):
        ow.step_batch_size(table)


@pytest.mark.parametrize(
    ("boundaries", "sizes", "match"),
    [
        ([10, 20], [8, 16], "must start at 0 samples, got boundaries"),
        ([0, 5], [8], "two non-empty sequences of one length, got 2 and 1"),
        ([0, 5, 3], [1, 2, 3], r"must not decrease, got \[0, 5, 3\]"),
        ([0], [0], r"batch_sizes\[0\] must be an integer >= 1"),
        ([], [], "two non-empty sequences"),
    ],
)
def test_batch_size_schedule_checks_its_table(boundaries, sizes, match):
    with pytest.raises(ValueError, match=match):
        ow.BatchSizeSchedule(boundaries, sizes)


def test_the_dtype_maximum_reads_as_a_saturated_count():
    schedule = ow.rampup_batch_size(32, 32, 300, 128)
    assert int(schedule(jnp.int8(126))) == 64
    assert int(schedule(jnp.int8(127))) == 128  # past every boundary, as documented
