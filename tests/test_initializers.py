"""Tests of he_conv_init, gaussian_fc_init and zero_gamma_init.

Targets are written out by hand from the paper's formulas (numpy), never taken from
the code under test. Statistical checks use large kernels and fresh keys: the sample
std of n ≥ 1e5 normal draws is within 3 % of the true std by more than 15 standard
errors, and the sample mean within 5 standard errors of 0.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import optax_warmup as ow
from optax_warmup._initializers import fan_out

# Large kernels of 1-D, 2-D and 3-D convolutions (flax layout: *spatial, in, out),
# with their fan-out target std written out by hand: sqrt(2 / (spatial × out)).
HE_CASES = [
    ((3, 128, 512), math.sqrt(2 / (3 * 512))),
    ((3, 3, 64, 256), math.sqrt(2 / (3 * 3 * 256))),
    ((3, 3, 3, 32, 128), math.sqrt(2 / (3 * 3 * 3 * 128))),
    ((1, 1, 1024, 256), math.sqrt(2 / 256)),  # 1×1 conv: fan_out = out
]
SEEDS = (1, 17, 2024)


def _check_normal(w: jax.Array, std: float) -> None:
    sample = np.asarray(w, np.float64)
    n = sample.size
    assert abs(sample.mean()) < 5 * std / math.sqrt(n), sample.mean()
    assert abs(sample.std() / std - 1) < 0.03, (sample.std(), std)


@pytest.mark.parametrize(("shape", "std"), HE_CASES)
@pytest.mark.parametrize("seed", SEEDS)
def test_he_conv_init_mean_and_std(shape, std, seed):
    w = ow.he_conv_init()(jax.random.key(seed), shape, jnp.float32)
    assert w.shape == shape
    assert w.dtype == jnp.float32
    _check_normal(w, std)


def test_he_conv_init_is_fan_out_not_flax_he_normal():
    # in != out: fan-in and fan-out targets differ by a factor 2 in std.
    shape = (3, 3, 256, 64)
    fan_out_std = math.sqrt(2 / (3 * 3 * 64))
    fan_in_std = math.sqrt(2 / (3 * 3 * 256))
    key = jax.random.key(5)
    ours = np.asarray(ow.he_conv_init()(key, shape, jnp.float32))
    flax_he = np.asarray(jax.nn.initializers.he_normal()(key, shape, jnp.float32))
    assert abs(ours.std() / fan_out_std - 1) < 0.03
    assert abs(flax_he.std() / fan_in_std - 1) < 0.03
    # Untruncated: a normal sample of 147k draws reaches beyond 4σ; flax's
    # truncated normal stops at 2σ of its underlying (unscaled) normal.
    assert np.abs(ours).max() > 4 * fan_out_std
    assert np.abs(flax_he).max() < 2.5 * fan_in_std


def test_gaussian_fc_init_default_is_stddev_001_not_variance():
    w = ow.gaussian_fc_init()(jax.random.key(3), (2048, 1000), jnp.float32)
    _check_normal(w, 0.01)  # σ = 0.01 (the paper), not σ² = 0.01 (the seed)
    assert abs(np.asarray(w).std() - 0.1) > 0.05


@pytest.mark.parametrize("stddev", [0.01, 0.5, 2])
@pytest.mark.parametrize("seed", SEEDS)
def test_gaussian_fc_init_mean_and_std(stddev, seed):
    w = ow.gaussian_fc_init(stddev)(jax.random.key(seed), (512, 256), jnp.float32)
    _check_normal(w, stddev)


@pytest.mark.parametrize("stddev", [0.0, -0.01, float("nan"), float("inf")])
def test_gaussian_fc_init_rejects_bad_stddev(stddev):
    with pytest.raises(ValueError, match="stddev") as info:
        ow.gaussian_fc_init(stddev)
    assert str(stddev) in str(info.value)


@pytest.mark.parametrize("shape", [(64, 128), (7,), (3, 3, 3, 3, 4, 8), (3, 0, 8)])
def test_he_conv_init_rejects_non_conv_shapes(shape):
    with pytest.raises(ValueError, match="shape"):
        ow.he_conv_init()(jax.random.key(0), shape, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dtype_kept(dtype):
    key = jax.random.key(0)
    he = ow.he_conv_init()(key, (3, 3, 64, 128), dtype)
    fc = ow.gaussian_fc_init()(key, (512, 1000), dtype)
    zero = ow.zero_gamma_init()(key, (64,), dtype)
    assert he.dtype == fc.dtype == zero.dtype == dtype
    # bf16 keeps the distribution (rounding changes the std by far less than 3 %).
    _check_normal(he.astype(jnp.float32), math.sqrt(2 / (9 * 128)))
    _check_normal(fc.astype(jnp.float32), 0.01)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple),
    dtype=st.sampled_from([jnp.bfloat16, jnp.float16, jnp.float32]),
    seed=st.integers(0, 2**31 - 1),
)
def test_zero_gamma_init_is_exactly_zero(shape, dtype, seed):
    gamma = ow.zero_gamma_init()(jax.random.key(seed), shape, dtype)
    assert gamma.shape == shape
    assert gamma.dtype == dtype
    assert not np.any(np.asarray(gamma, np.float32))


def test_keys_determine_samples_and_jit_matches_eager():
    init = ow.he_conv_init()
    shape = (3, 16, 32)
    a = init(jax.random.key(0), shape, jnp.float32)
    b = init(jax.random.key(0), shape, jnp.float32)
    c = init(jax.random.key(1), shape, jnp.float32)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    jitted = jax.jit(init, static_argnums=(1, 2))(jax.random.key(0), shape, jnp.float32)
    np.testing.assert_allclose(jitted, a, rtol=1e-6)


def test_default_dtype_is_float32():
    key = jax.random.key(0)
    assert ow.he_conv_init()(key, (3, 16, 32)).dtype == jnp.float32
    assert ow.gaussian_fc_init()(key, (16, 4)).dtype == jnp.float32
    assert ow.zero_gamma_init()(key, (8,)).dtype == jnp.float32


def test_plug_into_nnx_layers():
    rngs = nnx.Rngs(0)
    conv = nnx.Conv(
        16, 32, (3,), use_bias=False, kernel_init=ow.he_conv_init(), rngs=rngs
    )
    fc = nnx.Linear(16, 4, kernel_init=ow.gaussian_fc_init(), rngs=rngs)
    bn = nnx.BatchNorm(16, scale_init=ow.zero_gamma_init(), rngs=rngs)
    assert conv.kernel.shape == (3, 16, 32)
    assert fc.kernel.shape == (16, 4)
    np.testing.assert_array_equal(bn.scale[...], np.zeros(16))


@pytest.mark.parametrize("seed", SEEDS)
def test_bf16_samples_keep_tails_and_zero_mean(seed):
    # jax.random.normal drawn directly in bf16 stops near 2.9σ and has mean ≈ -0.01σ
    # (8 standard errors at this size); ours is drawn in float32 and rounded.
    w = ow.gaussian_fc_init(1.0)(jax.random.key(seed), (512, 1000), jnp.bfloat16)
    sample = np.asarray(w, np.float64)
    assert np.abs(sample).max() > 3.5
    assert abs(sample.mean()) < 5 / math.sqrt(sample.size)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((3, 128, 512), 3 * 512),
        ((3, 3, 64, 256), 3 * 3 * 256),
        ((3, 3, 3, 32, 128), 3 * 3 * 3 * 128),
        ((1, 1, 1024, 256), 256),
        ((5, 7, 2, 9), 5 * 7 * 9),  # non-square kernel: every spatial size counts
    ],
)
def test_fan_out_is_spatial_size_times_output_channels(shape, expected):
    assert fan_out(shape) == expected
    # he_conv_init draws with it: the sample std is sqrt(2 / fan_out).
    if math.prod(shape) >= 100_000:
        w = ow.he_conv_init()(jax.random.key(0), shape, jnp.float32)
        _check_normal(w, math.sqrt(2 / expected))


def test_dtype_none_is_float32_and_out_sharding_is_honoured():
    # jax.nn.initializers.Initializer's out_sharding: under a mesh with explicit
    # axes, P("d") puts axis 0 on "d" (visible in the sharding even on 1 device).
    key = jax.random.key(0)
    mesh = jax.make_mesh((1,), ("d",), axis_types=(AxisType.Explicit,))
    inits = [ow.he_conv_init(), ow.gaussian_fc_init(), ow.zero_gamma_init()]
    for init, shape in zip(inits, [(3, 16, 32), (16, 4), (8,)], strict=True):
        plain = init(key, shape)
        none = init(key, shape, None)
        assert none.dtype == jnp.float32
        np.testing.assert_array_equal(none, plain)
        with jax.set_mesh(mesh):
            sharded = init(key, shape, jnp.float32, P("d"))
            default = init(key, shape, jnp.float32)
        assert sharded.sharding.spec[0] == "d"
        assert default.sharding.spec[0] is None
        np.testing.assert_array_equal(sharded, plain)
