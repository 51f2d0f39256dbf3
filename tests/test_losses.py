"""Tests for smooth_labels and smoothed_cross_entropy (optax_warmup/_losses.py).

Reference values come from numpy written out below in float64, or from the optax
construct the loss replaces: softmax_cross_entropy(logits, smooth_labels(one_hot)).
"""

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_warmup as ow

# ------------------------------------------------------------------ references


def np_smooth_labels(labels, alpha):
    """The seed's formula, in float64, without its 2-D restriction."""
    labels = np.asarray(labels, np.float64)
    alpha = np.asarray(alpha, np.float64)[..., None]
    return labels * (1 - alpha) + alpha / labels.shape[-1]


def np_log_softmax(logits):
    z = np.asarray(logits, np.float64)
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_smoothed_ce(logits, labels, alpha):
    """Cross-entropy against the smoothed one-hot target, in float64."""
    num_classes = np.shape(logits)[-1]
    one_hot = (np.arange(num_classes) == np.asarray(labels)[..., None]).astype(float)
    target = np_smooth_labels(one_hot, alpha)
    return -(target * np_log_softmax(logits)).sum(axis=-1)


def np_smoothed_ce_grad(logits, labels, alpha):
    """d loss_i / d logits_i = softmax - smoothed target (row by row)."""
    num_classes = np.shape(logits)[-1]
    one_hot = (np.arange(num_classes) == np.asarray(labels)[..., None]).astype(float)
    return np.exp(np_log_softmax(logits)) - np_smooth_labels(one_hot, alpha)


def optax_reference(logits, labels, alpha):
    num_classes = logits.shape[-1]
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
    alpha = jnp.asarray(alpha, logits.dtype)[..., None]
    target = one_hot * (1 - alpha) + alpha / num_classes
    return optax.softmax_cross_entropy(logits, target)


def make(shape, key=0, scale=3.0):
    """Random float32 logits and int32 labels (numpy RNG: nothing to compile)."""
    rng = np.random.default_rng(key)
    logits = (scale * rng.standard_normal(shape)).astype(np.float32)
    labels = rng.integers(0, shape[-1], size=shape[:-1]).astype(np.int32)
    return jnp.asarray(logits), jnp.asarray(labels)


# --------------------------------------------------------------- smooth_labels


@pytest.mark.parametrize("shape", [(5,), (4, 5), (2, 3, 5), (2, 1, 3, 7)])
def test_smooth_labels_any_leading_axes(shape):
    labels = jax.nn.one_hot(np.arange(math.prod(shape[:-1])) % shape[-1], shape[-1])
    labels = labels.reshape(shape)
    out = ow.smooth_labels(labels, 0.2)
    assert out.shape == shape
    np.testing.assert_allclose(out, np_smooth_labels(labels, 0.2), rtol=1e-6)


def test_smooth_labels_matches_seed_and_optax():
    labels = jax.nn.one_hot(jnp.array([0, 2, 1]), 4)
    # The seed: y *= 1 - f; y += f / y.shape[1].
    seed = np.array(labels, np.float64)
    seed *= 1 - 0.1
    seed += 0.1 / seed.shape[1]
    np.testing.assert_allclose(ow.smooth_labels(labels, 0.1), seed, rtol=1e-6)
    chex.assert_trees_all_close(
        ow.smooth_labels(labels, 0.1), optax.smooth_labels(labels, 0.1)
    )


def test_smooth_labels_does_not_modify_its_input():
    labels = np.eye(3, dtype=np.float32)
    before = labels.copy()
    ow.smooth_labels(labels, 0.3)
    np.testing.assert_array_equal(labels, before)


def test_smooth_labels_alpha_zero_and_one():
    labels = jax.nn.one_hot(jnp.array([1, 0]), 4)
    np.testing.assert_array_equal(ow.smooth_labels(labels, 0.0), labels)
    np.testing.assert_allclose(ow.smooth_labels(labels, 1.0), np.full((2, 4), 0.25))
    np.testing.assert_allclose(ow.smooth_labels(labels, 1), np.full((2, 4), 0.25))


def test_smooth_labels_per_example_alpha():
    labels = jax.nn.one_hot(jnp.arange(6).reshape(2, 3) % 4, 4)  # (2, 3, 4)
    for alpha in (
        jnp.array([[0.0, 0.1, 0.5], [0.2, 0.3, 1.0]]),  # (2, 3): one per example
        jnp.array([0.1, 0.7]).reshape(2, 1),  # (2, 1): broadcasts over T
        np.array([0.25]),  # (1,)
    ):
        out = ow.smooth_labels(labels, alpha)
        expected = np_smooth_labels(labels, np.broadcast_to(alpha, (2, 3)))
        np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_smooth_labels_vmap_over_rows_and_over_alpha():
    labels = jax.nn.one_hot(jnp.array([0, 3, 2]), 5)
    # Each vmapped call sees a 1-D (K,) vector: the seed's 2-D assert would fail.
    rows = jax.vmap(lambda row: ow.smooth_labels(row, 0.1))(labels)
    np.testing.assert_allclose(rows, np_smooth_labels(labels, 0.1), rtol=1e-6)
    alphas = jnp.array([0.0, 0.1, 0.5, 1.0])
    swept = jax.vmap(lambda a: ow.smooth_labels(labels, a))(alphas)
    assert swept.shape == (4, 3, 5)
    for i, a in enumerate(np.asarray(alphas)):
        np.testing.assert_allclose(swept[i], np_smooth_labels(labels, a), rtol=1e-6)


def test_smooth_labels_jit_with_traced_alpha_equals_eager():
    labels = jax.nn.one_hot(jnp.array([0, 1, 2]), 3)
    jitted = jax.jit(ow.smooth_labels)
    for alpha in (0.0, 0.3, 1.0):
        chex.assert_trees_all_close(
            jitted(labels, alpha), ow.smooth_labels(labels, alpha)
        )
    # A traced alpha cannot be checked (documented): it is used as given.
    np.testing.assert_allclose(
        jitted(labels, 2.0), np_smooth_labels(labels, 2.0), rtol=1e-6
    )


def test_smooth_labels_grad_through_alpha():
    labels = jax.nn.one_hot(jnp.array([0, 1]), 4)
    grad = jax.grad(lambda a: ow.smooth_labels(labels, a)[0, 0])(0.1)
    np.testing.assert_allclose(grad, -1 + 1 / 4, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_smooth_labels_keeps_dtype(dtype):
    labels = jax.nn.one_hot(jnp.array([0, 2]), 3, dtype=dtype)
    out = ow.smooth_labels(labels, 0.1)
    assert out.dtype == dtype
    np.testing.assert_allclose(
        np.asarray(out, np.float64), np_smooth_labels(labels, 0.1), rtol=1e-2
    )
    assert ow.smooth_labels(labels, jnp.array([0.1, 0.2])).dtype == dtype


@settings(max_examples=25, deadline=None)
@given(
    shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
    alpha=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_smooth_labels_property_distribution_kept(shape, alpha, seed):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(shape[-1]), size=shape[:-1]).astype(np.float32)
    out = np.asarray(ow.smooth_labels(probs, alpha), np.float64)
    np.testing.assert_allclose(out, np_smooth_labels(probs, alpha), atol=1e-6)
    np.testing.assert_allclose(out.sum(axis=-1), 1.0, atol=1e-5)
    assert (out >= alpha / shape[-1] - 1e-6).all()


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), np.array([0.1, 2.0])])
def test_smooth_labels_rejects_bad_alpha(alpha):
    labels = jnp.eye(2)
    with pytest.raises(ValueError, match=r"alpha.*(-0\.1|1\.5|nan|2\.0)"):
        ow.smooth_labels(labels, alpha)


def test_smooth_labels_rejects_alpha_of_wrong_shape():
    with pytest.raises(ValueError, match=r"alpha.*\(3,\)"):
        ow.smooth_labels(jnp.eye(2), jnp.array([0.1, 0.2, 0.3]))


@pytest.mark.parametrize("labels", [jnp.array([[0, 1]]), jnp.array([[True, False]])])
def test_smooth_labels_rejects_integer_labels_with_advice(labels):
    with pytest.raises(TypeError, match=r"labels.*one_hot.*smoothed_cross_entropy"):
        ow.smooth_labels(labels, 0.1)


def test_smooth_labels_rejects_scalar_labels():
    with pytest.raises(ValueError, match="labels"):
        ow.smooth_labels(jnp.float32(1.0), 0.1)


# ------------------------------------------------------ smoothed_cross_entropy


@pytest.mark.parametrize("shape", [(7,), (6, 11), (2, 3, 11)])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 1.0])
def test_loss_matches_numpy_and_optax(shape, alpha):
    logits, labels = make(shape)
    loss = ow.smoothed_cross_entropy(logits, labels, alpha)
    assert loss.shape == shape[:-1]
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(
        loss, np_smoothed_ce(logits, labels, alpha), rtol=1e-5, atol=1e-5
    )
    chex.assert_trees_all_close(
        loss, optax_reference(logits, labels, alpha), rtol=1e-5, atol=1e-5
    )


def test_loss_alpha_zero_is_optax_integer_label_loss():
    logits, labels = make((8, 13))
    chex.assert_trees_all_close(
        ow.smoothed_cross_entropy(logits, labels, 0.0),
        optax.softmax_cross_entropy_with_integer_labels(logits, labels),
        rtol=1e-6,
    )


def test_loss_default_alpha_is_point_one():
    logits, labels = make((4, 9))
    chex.assert_trees_all_close(
        ow.smoothed_cross_entropy(logits, labels),
        ow.smoothed_cross_entropy(logits, labels, 0.1),
    )


def test_loss_per_example_alpha():
    logits, labels = make((3, 4, 10))
    alpha = jnp.array([[0.0, 0.1, 0.5, 1.0]] * 3) * jnp.array([[1.0], [0.5], [0.2]])
    np.testing.assert_allclose(
        ow.smoothed_cross_entropy(logits, labels, alpha),
        np_smoothed_ce(logits, labels, alpha),
        rtol=1e-5,
        atol=1e-6,
    )


def test_loss_probability_targets_match_optax():
    logits, _ = make((5, 2, 6))
    rng = np.random.default_rng(0)
    targets = rng.dirichlet(np.ones(6), size=(5, 2)).astype(np.float32)
    for alpha in (0.0, 0.3, jnp.linspace(0, 1, 10).reshape(5, 2)):
        smoothed = np_smooth_labels(targets, alpha).astype(np.float32)
        expected = optax.softmax_cross_entropy(logits, smoothed)
        chex.assert_trees_all_close(
            ow.smoothed_cross_entropy(logits, targets, alpha),
            expected,
            rtol=1e-5,
            atol=1e-6,
        )


def test_loss_one_hot_float_targets_equal_integer_labels():
    logits, labels = make((6, 9))
    one_hot = jax.nn.one_hot(labels, 9)
    chex.assert_trees_all_close(
        ow.smoothed_cross_entropy(logits, one_hot, 0.2),
        ow.smoothed_cross_entropy(logits, labels, 0.2),
        rtol=1e-6,
        atol=1e-6,
    )


@jax.jit
def _loss_and_grad(logits, labels, alpha):
    return jax.value_and_grad(
        lambda z: ow.smoothed_cross_entropy(z, labels, alpha).sum()
    )(logits)


@settings(max_examples=30, deadline=None)
@given(
    # A few shapes, so that the jitted function compiles a few times, not per example.
    shape=st.sampled_from([(1, 1), (3, 2), (2, 7), (4, 9)]),
    alpha=st.floats(0.0, 1.0),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_loss_and_grad_property_against_numpy(shape, alpha, scale, seed):
    logits, labels = make(shape, key=seed, scale=scale)
    loss, grad = _loss_and_grad(logits, labels, alpha)
    expected = np_smoothed_ce(logits, labels, alpha)
    np.testing.assert_allclose(loss, expected.sum(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        grad, np_smoothed_ce_grad(logits, labels, alpha), atol=1e-5
    )
    # Cross-entropy is at least the entropy of the target, which is >= 0.
    assert (expected > -1e-12).all() and loss > -1e-4


def test_grad_matches_optax_reference_and_is_finite():
    logits, labels = make((16, 50))

    def mean_loss(fn):
        return jax.grad(lambda z: fn(z, labels, 0.1).mean())(logits)

    ours = mean_loss(ow.smoothed_cross_entropy)
    assert jnp.isfinite(ours).all()
    chex.assert_trees_all_close(ours, mean_loss(optax_reference), atol=1e-7)


def test_grad_with_respect_to_alpha_matches_optax_reference():
    logits, labels = make((4, 7))
    alpha = jnp.array([0.0, 0.1, 0.5, 1.0])

    def grad_alpha(fn):
        return jax.grad(lambda a: fn(logits, labels, a).sum())(alpha)

    chex.assert_trees_all_close(
        grad_alpha(ow.smoothed_cross_entropy), grad_alpha(optax_reference), atol=1e-5
    )


def test_forward_mode_and_hessian_match_optax_reference():
    logits, labels = make((2, 5))
    tangent = jnp.asarray(np.random.default_rng(9).standard_normal((2, 5)), jnp.float32)

    def jvp(fn):
        return jax.jit(lambda z, t: jax.jvp(lambda x: fn(x, labels, 0.2), (z,), (t,)))(
            logits, tangent
        )

    chex.assert_trees_all_close(
        jvp(ow.smoothed_cross_entropy), jvp(optax_reference), atol=1e-6
    )

    def hessian(fn):
        return jax.jit(jax.hessian(lambda z: fn(z, labels, 0.2).sum()))(logits)

    chex.assert_trees_all_close(
        hessian(ow.smoothed_cross_entropy), hessian(optax_reference), atol=1e-6
    )


def test_jit_equals_eager_and_alpha_does_not_retrace():
    logits, labels = make((4, 6))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def loss_fn(z, y, alpha):
        return ow.smoothed_cross_entropy(z, y, alpha)

    for alpha in (0.0, 0.1, 0.7):
        chex.assert_trees_all_close(
            loss_fn(logits, labels, alpha),
            ow.smoothed_cross_entropy(logits, labels, alpha),
            rtol=1e-6,
        )


def test_vmap_over_examples_and_over_alpha():
    logits, labels = make((5, 8))
    per_row = jax.vmap(lambda z, y: ow.smoothed_cross_entropy(z, y, 0.1))(
        logits, labels
    )
    chex.assert_trees_all_close(
        per_row, ow.smoothed_cross_entropy(logits, labels, 0.1), rtol=1e-6
    )
    alphas = jnp.array([0.0, 0.2, 1.0])
    swept = jax.vmap(lambda a: ow.smoothed_cross_entropy(logits, labels, a))(alphas)
    for i, a in enumerate(np.asarray(alphas)):
        np.testing.assert_allclose(
            swept[i], np_smoothed_ce(logits, labels, a), rtol=1e-5, atol=1e-6
        )
    grads = jax.vmap(
        jax.grad(lambda z, y: ow.smoothed_cross_entropy(z, y, 0.1)), in_axes=(0, 0)
    )(logits, labels)
    np.testing.assert_allclose(
        grads, np_smoothed_ce_grad(logits, labels, 0.1), atol=1e-6
    )


def test_where_gives_zero_loss_and_exactly_zero_grad():
    logits, labels = make((6, 10))
    where = jnp.array([True, False, True, True, False, True])
    # Padding rows hold garbage: NaN and inf logits, torch-style -100 labels.
    logits = logits.at[1].set(jnp.nan).at[4, 3].set(jnp.inf)
    labels = labels.at[1].set(-100).at[4].set(10)
    loss, grad = jax.value_and_grad(
        lambda z: ow.smoothed_cross_entropy(z, labels, 0.1, where=where).sum(),
    )(logits)
    per_row = ow.smoothed_cross_entropy(logits, labels, 0.1, where=where)
    np.testing.assert_array_equal(per_row[~where], 0.0)
    np.testing.assert_array_equal(grad[~where], 0.0)
    assert np.isfinite(loss) and jnp.isfinite(grad).all()
    kept = np.asarray(where)
    np.testing.assert_allclose(
        per_row[kept], np_smoothed_ce(logits[kept], labels[kept], 0.1), rtol=1e-5
    )
    np.testing.assert_allclose(
        grad[kept], np_smoothed_ce_grad(logits[kept], labels[kept], 0.1), atol=1e-6
    )


def test_where_with_probability_targets():
    logits, labels = make((4, 5))
    targets = jax.nn.one_hot(labels, 5)
    where = jnp.array([True, False, False, True])
    logits = logits.at[2].set(jnp.nan)
    loss, grad = jax.value_and_grad(
        lambda z: ow.smoothed_cross_entropy(z, targets, 0.1, where=where).sum()
    )(logits)
    expected = np_smoothed_ce(logits, labels, 0.1)[np.asarray(where)].sum()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_array_equal(grad[~where], 0.0)
    assert jnp.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.uint8, jnp.int32])
def test_out_of_range_labels_give_nan(dtype):
    logits, _ = make((5, 7))
    bad = [-1, 7, 100] if jnp.issubdtype(dtype, jnp.signedinteger) else [7, 255, 100]
    labels = jnp.array([0, bad[0], 6, bad[1], bad[2]], dtype)
    loss = ow.smoothed_cross_entropy(logits, labels, 0.1)
    assert np.isnan(np.asarray(loss)[[1, 3, 4]]).all()
    ok = np.array([0, 2])
    np.testing.assert_allclose(
        loss[ok], np_smoothed_ce(logits[ok], np.array([0, 6]), 0.1), rtol=1e-5
    )
    grad = jax.grad(lambda z: ow.smoothed_cross_entropy(z, labels, 0.1)[0])(logits)
    assert jnp.isfinite(grad).all()


@pytest.mark.parametrize("num_classes", [40000, 65537])
def test_long_rows_cut_into_pieces_on_cpu_give_the_same_values(num_classes):
    # Above 32768 classes the CPU path sums exp in row pieces (40000 = 2 x 20000);
    # 65537 is prime, so it is not cut. Both must equal the reference.
    logits, labels = make((2, 3, num_classes), scale=5.0)
    loss = ow.smoothed_cross_entropy(logits, labels, 0.1)
    np.testing.assert_allclose(loss, np_smoothed_ce(logits, labels, 0.1), rtol=1e-5)
    per_row = jax.vmap(ow.smoothed_cross_entropy, in_axes=(0, 0, None))(
        logits, labels, 0.1
    )
    np.testing.assert_allclose(per_row, loss, rtol=1e-6)
    grad = jax.grad(lambda z: ow.smoothed_cross_entropy(z, labels, 0.1).sum())(logits)
    np.testing.assert_allclose(
        grad, np_smoothed_ce_grad(logits, labels, 0.1), atol=1e-6
    )


def _exp_shapes(module_text):
    """The shapes of the float32 arrays that ``exp`` runs over in a StableHLO module."""
    return set(
        re.findall(r"stablehlo\.exponential %\S+ : tensor<([\dx]+)xf32>", module_text)
    )


def test_cpu_row_pieces_are_chosen_at_lowering_time_not_trace_time():
    # Traced once on this CPU host, exported for CPU and CUDA: each platform gets
    # its own path. 40000 classes cut into 2 pieces of 20000 on CPU only.
    shape = (2, 3, 40000)
    pieces, plain = "12x20000", "2x3x40000"

    def f(z, y):
        return ow.smoothed_cross_entropy(z, y, 0.1)

    args = (
        jax.ShapeDtypeStruct(shape, jnp.float32),
        jax.ShapeDtypeStruct(shape[:-1], jnp.int32),
    )

    def exported(*platforms):
        return jax.export.export(jax.jit(f), platforms=platforms)(*args)

    assert _exp_shapes(exported("cpu").mlir_module()) == {pieces}
    assert _exp_shapes(exported("cuda").mlir_module()) == {plain}
    both = exported("cpu", "cuda")
    assert both.platforms == ("cpu", "cuda")
    text = both.mlir_module()
    # One module with both paths, chosen by the platform it is compiled for.
    assert _exp_shapes(text) == {pieces, plain}
    assert "_platform_index" in text and "stablehlo.case" in text
    # Compiled here (CPU), the choice is resolved: exp runs over the pieces only.
    logits, labels = make(shape, scale=5.0)
    compiled = jax.jit(both.call).lower(logits, labels).compile().as_text()
    exps = re.findall(r"= f32\[([\d,]+)\]\S* exponential\(", compiled)
    assert exps and set(exps) == {"12,20000"}, exps
    # And the CPU result is the reference's, values and gradients.
    np.testing.assert_allclose(
        both.call(logits, labels), np_smoothed_ce(logits, labels, 0.1), rtol=1e-5
    )
    grad = jax.grad(lambda z: both.call(z, labels).sum())(logits)
    np.testing.assert_allclose(
        grad, np_smoothed_ce_grad(logits, labels, 0.1), atol=1e-6
    )


@pytest.mark.parametrize("peak", [60.0, 85.0, 120.0, 1e30])
def test_forward_is_exact_for_any_spread_of_the_logits(peak):
    # The forward pass shifts exp by the row mean, which the loss needs anyway;
    # when a row's max - mean passes ~88 the sum overflows and every row is
    # recomputed with the max as the shift. Both sides of that edge, jitted and
    # under vmap (where both branches run), must match the float64 reference.
    logits, labels = make((5, 4000))
    logits = np.array(logits)
    logits[1, 7] = peak
    labels = np.array(labels)
    labels[3] = 7
    expected = np_smoothed_ce(logits, labels, 0.1)
    loss = ow.smoothed_cross_entropy(logits, labels, 0.1)
    np.testing.assert_allclose(loss, expected, rtol=2e-6)
    per_row = jax.vmap(ow.smoothed_cross_entropy, in_axes=(0, 0, None))(
        logits, labels, 0.1
    )
    np.testing.assert_allclose(per_row, expected, rtol=2e-6)
    # A masked row of NaN logits neither changes the other rows nor shows.
    logits[4] = np.nan
    where = np.arange(5) != 4
    masked = ow.smoothed_cross_entropy(logits, labels, 0.1, where=where)
    np.testing.assert_allclose(masked[:4], expected[:4], rtol=2e-6)
    assert masked[4] == 0


def test_large_vocabulary_labels_in_small_dtype():
    logits, labels = make((3, 300))
    labels = jnp.array([299, 0, 255], jnp.int16)
    np.testing.assert_allclose(
        ow.smoothed_cross_entropy(logits, labels, 0.1),
        np_smoothed_ce(logits, np.asarray(labels), 0.1),
        rtol=1e-5,
    )


def test_stable_for_logits_of_magnitude_1e4():
    rng = np.random.default_rng(0)
    logits = rng.uniform(-1e4, 1e4, size=(32, 100)).astype(np.float32)
    logits[0] = -1e4
    logits[0, 3] = 1e4  # a confident, correct row: the loss is alpha·(lse - mean)
    labels = rng.integers(0, 100, size=32)
    labels[0] = 3
    for alpha in (0.0, 0.1):
        grad = jax.grad(
            lambda z, a=alpha: ow.smoothed_cross_entropy(z, labels, a).sum()
        )(jnp.asarray(logits))
        per_row = ow.smoothed_cross_entropy(logits, labels, alpha)
        assert jnp.isfinite(per_row).all() and jnp.isfinite(grad).all()
        expected = np_smoothed_ce(logits, labels, alpha)
        # float32 carries ~1e-3 absolute at 1e4; relative error stays ~1e-6.
        np.testing.assert_allclose(per_row, expected, rtol=1e-5, atol=2e-3)
        np.testing.assert_allclose(
            grad, np_smoothed_ce_grad(logits, labels, alpha), atol=1e-5
        )
    assert ow.smoothed_cross_entropy(logits[:1], labels[:1], 0.0)[0] == 0.0


def test_minus_inf_logits_at_alpha_zero_stay_finite():
    logits = jnp.array([[2.0, -jnp.inf, 0.0], [1.0, 1.0, -jnp.inf]])
    labels = jnp.array([0, 1])
    loss, grad = jax.value_and_grad(
        lambda z: ow.smoothed_cross_entropy(z, labels, 0.0).sum()
    )(logits)
    np.testing.assert_allclose(
        ow.smoothed_cross_entropy(logits, labels, 0.0),
        optax.softmax_cross_entropy_with_integer_labels(logits, labels),
        rtol=1e-6,
    )
    assert jnp.isfinite(loss) and jnp.isfinite(grad).all()
    # With alpha > 0 the target puts mass on the impossible class: the loss is inf.
    assert jnp.isposinf(ow.smoothed_cross_entropy(logits, labels, 0.1)).all()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_logits_reduce_in_float32(dtype):
    logits, labels = make((8, 40), scale=5.0)
    logits = logits.astype(dtype)
    loss = ow.smoothed_cross_entropy(logits, labels, 0.1)
    assert loss.dtype == jnp.float32
    # Reduced in float32 from the rounded logits: as exact as float32 allows.
    np.testing.assert_allclose(
        loss, np_smoothed_ce(np.asarray(logits, np.float64), labels, 0.1), rtol=1e-5
    )
    grad = jax.grad(lambda z: ow.smoothed_cross_entropy(z, labels, 0.1).mean())(logits)
    assert grad.dtype == dtype
    np.testing.assert_allclose(
        np.asarray(grad, np.float64),
        np_smoothed_ce_grad(np.asarray(logits, np.float64), labels, 0.1) / 8,
        atol=1e-3,
    )


def test_strict_dtype_promotion():
    logits, labels = make((3, 5))
    with jax.numpy_dtype_promotion("strict"):
        ow.smoothed_cross_entropy(logits, labels, 0.1, where=jnp.ones(3, bool))
        ow.smoothed_cross_entropy(logits, jax.nn.one_hot(labels, 5), 0.1)
        ow.smooth_labels(jax.nn.one_hot(labels, 5), 0.1)
        jax.grad(lambda z: ow.smoothed_cross_entropy(z, labels, 0.1).sum())(logits)


# --------------------------------------------------------------------- memory


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_compiled_temporary_memory_is_a_quarter_of_the_one_hot_path():
    shape = (512, 8192)
    logits = jax.ShapeDtypeStruct(shape, jnp.float32)
    labels = jax.ShapeDtypeStruct(shape[:1], jnp.int32)

    def ours(z, y):
        return ow.smoothed_cross_entropy(z, y, 0.1).mean()

    def one_hot_way(z, y):
        return optax_reference(z, y, 0.1).mean()

    for transform in (lambda f: f, jax.value_and_grad):
        ours_bytes = _temp_bytes(transform(ours), logits, labels)
        theirs = _temp_bytes(transform(one_hot_way), logits, labels)
        assert 4 * ours_bytes <= theirs, (ours_bytes, theirs)
        # And in absolute terms: no (B, K) temporary at all (one is 16 MiB here).
        assert ours_bytes < np.prod(shape) * 4 // 8, ours_bytes


# -------------------------------------------------------------------- sharding

_SHARDED_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import optax_warmup as ow

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    rng = np.random.default_rng(0)
    logits = jnp.asarray(3 * rng.standard_normal((16, 64)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 64, size=16), jnp.int32)
    where = jnp.arange(16) % 5 != 0

    def f(z, y, w):
        loss = ow.smoothed_cross_entropy(z, y, 0.1, where=w)
        return loss.sum() / w.sum(), loss

    step = jax.jit(jax.value_and_grad(f, has_aux=True))
    (mean, per_row), grad = step(logits, labels, where)
    results = {}
    for name, spec in (("batch", P("data")), ("batch_and_vocab", P("data", "model"))):
        z = jax.device_put(logits, NamedSharding(mesh, spec))
        y = jax.device_put(labels, NamedSharding(mesh, P("data")))
        w = jax.device_put(where, NamedSharding(mesh, P("data")))
        (s_mean, s_rows), s_grad = step(z, y, w)
        results[name] = {
            "devices": len(s_grad.sharding.device_set),
            "mean": float(abs(s_mean - mean)),
            "rows": float(jnp.abs(s_rows - per_row).max()),
            "grad": float(jnp.abs(s_grad - grad).max()),
        }
    print(json.dumps(results))
    """
)


@pytest.mark.slow
def test_sharded_inputs_over_a_device_mesh():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name, diffs in results.items():
        assert diffs["devices"] == 8, name
        assert diffs["mean"] < 1e-5 and diffs["rows"] < 1e-5, (name, diffs)
        assert diffs["grad"] < 1e-6, (name, diffs)


# ----------------------------------------------------------------- bad input


def test_rejects_labels_of_the_wrong_shape():
    logits, labels = make((4, 6))
    with pytest.raises(ValueError, match=r"labels\.shape=\(4, 1\)"):
        ow.smoothed_cross_entropy(logits, labels[:, None], 0.1)
    with pytest.raises(ValueError, match=r"labels\.shape=\(3,\)"):
        ow.smoothed_cross_entropy(logits, labels[:3], 0.1)
    with pytest.raises(ValueError, match=r"probability labels.*labels\.shape=\(4, 5\)"):
        ow.smoothed_cross_entropy(logits, jnp.zeros((4, 5)), 0.1)


def test_rejects_labels_of_the_wrong_dtype():
    logits, labels = make((4, 6))
    with pytest.raises(TypeError, match=r"labels.*bool"):
        ow.smoothed_cross_entropy(logits, labels > 2, 0.1)


def test_rejects_bad_logits():
    _, labels = make((4, 6))
    with pytest.raises(TypeError, match=r"logits.*int32"):
        ow.smoothed_cross_entropy(jnp.ones((4, 6), jnp.int32), labels)
    with pytest.raises(ValueError, match=r"logits\.shape=\(\)"):
        ow.smoothed_cross_entropy(jnp.float32(1.0), jnp.int32(0))
    with pytest.raises(ValueError, match=r"logits\.shape=\(4, 0\)"):
        ow.smoothed_cross_entropy(jnp.ones((4, 0)), labels)


@pytest.mark.parametrize("alpha", [-0.5, 1.01, float("nan"), jnp.array([0.1, -1.0])])
def test_rejects_bad_alpha(alpha):
    logits, labels = make((2, 6))
    with pytest.raises(ValueError, match=r"alpha.*(-0\.5|1\.01|nan|-1\.0)"):
        ow.smoothed_cross_entropy(logits, labels, alpha)


def test_rejects_alpha_that_does_not_broadcast():
    logits, labels = make((2, 6))
    with pytest.raises(ValueError, match=r"alpha.*\(6,\)"):
        ow.smoothed_cross_entropy(logits, labels, jnp.full(6, 0.1))
    with pytest.raises(TypeError, match=r"alpha.*complex"):
        ow.smoothed_cross_entropy(logits, labels, 0.1 + 0j)


def test_traced_alpha_is_not_checked():
    logits, labels = make((2, 6))
    out = jax.jit(ow.smoothed_cross_entropy)(logits, labels, 1.5)
    np.testing.assert_allclose(
        out, np_smoothed_ce(logits, labels, 1.5), rtol=1e-5, atol=1e-5
    )


def test_rejects_bad_where():
    logits, labels = make((4, 6))
    with pytest.raises(ValueError, match=r"where\.shape=\(4, 1\)"):
        ow.smoothed_cross_entropy(logits, labels, where=jnp.ones((4, 1), bool))
    with pytest.raises(TypeError, match=r"where.*float32"):
        ow.smoothed_cross_entropy(logits, labels, where=jnp.ones(4))
