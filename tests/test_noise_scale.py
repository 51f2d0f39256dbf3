"""The gradient noise scale: the closed form of linear regression, the JAX contract,
composition with the recipes, nnx.Optimizer and TrainState, an orbax checkpoint
resumed in a fresh process, and an 8-device mesh against one device.

The closed form. Inputs x ~ N(0, I_d), labels y = x·w* + ε with ε ~ N(0, σ²), the
per-example loss ½(x·w − y)² at w = w* + r has the gradient g = x (x·r − ε). Its
mean is G = E[x xᵀ] r = r, so |G|² = |r|². By Isserlis' theorem
E[x xᵀ (x·r)²] = |r|² I + 2 r rᵀ, and E[ε²] = σ², so E[g gᵀ] = (|r|² + σ²) I + 2 r rᵀ
and Σ = E[g gᵀ] − r rᵀ = (|r|² + σ²) I + r rᵀ: tr Σ = d (|r|² + σ²) + |r|².
``test_closed_form_by_monte_carlo`` checks this with numpy alone.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from hypothesis import given, settings

import optax_warmup as ow

ROOT = Path(__file__).resolve().parents[1]

D, SIGMA2 = 8, 1.0
R = jnp.full((D,), 1 / np.sqrt(D))  # |r|² = 1
W_STAR = jax.random.normal(jax.random.key(7), (D,))
W = W_STAR + R
G2_TRUE = 1.0  # |r|²
TRACE_TRUE = D * (1.0 + SIGMA2) + 1.0  # d (|r|² + σ²) + |r|² = 17
B_TRUE = TRACE_TRUE / G2_TRUE
B_SMALL, GROUPS = 8, 8
B_BIG = B_SMALL * GROUPS


def regression_loss(w, x, y):
    return 0.5 * jnp.mean((x @ w - y) ** 2)


def sample(key, n):
    kx, ke = jax.random.split(key)
    x = jax.random.normal(kx, (n, D))
    y = x @ W_STAR + np.sqrt(SIGMA2) * jax.random.normal(ke, (n,))
    return x, y


by_group = ow.value_and_grad_by_group(regression_loss, group_size=B_SMALL)


# --- the closed form -------------------------------------------------------------


def test_closed_form_by_monte_carlo():
    """|G|² = |r|² and tr Σ = d(|r|² + σ²) + |r|², from 2·10⁶ numpy examples."""
    rng = np.random.default_rng(0)
    d, sigma2, n = 6, 0.49, 2_000_000
    r = rng.normal(size=d) * 0.5
    x = rng.normal(size=(n, d))
    eps = rng.normal(size=n) * np.sqrt(sigma2)
    g = x * (x @ r - eps)[:, None]
    mean = g.mean(0)
    np.testing.assert_allclose(mean @ mean, r @ r, rtol=0.02)
    np.testing.assert_allclose(
        np.trace(np.cov(g, rowvar=False)), d * (r @ r + sigma2) + r @ r, rtol=0.01
    )


def test_estimates_converge_to_closed_form():
    """4000 batches of 64 (8 groups of 8): the means of the per-batch estimates are
    within 3% (|G|²) and 2% (tr Σ) of the closed form, and within 4 standard errors."""
    batches = 4000
    keys = jax.random.split(jax.random.key(0), batches)

    @jax.jit
    @jax.vmap
    def estimates(key):
        _, _, small, big = by_group(W, *sample(key, B_BIG))
        return ow.noise_scale_estimates(small, big, B_SMALL, B_BIG)

    g2, trace_sigma = map(np.asarray, estimates(keys))
    for values, truth, rtol in [(g2, G2_TRUE, 0.03), (trace_sigma, TRACE_TRUE, 0.02)]:
        standard_error = values.std() / np.sqrt(batches)
        assert abs(values.mean() - truth) < 4 * standard_error, (values.mean(), truth)
        np.testing.assert_allclose(values.mean(), truth, rtol=rtol)
    assert g2.std() > 0.3 * G2_TRUE  # one batch's estimate is noisy: average them


def test_tracker_in_jitted_loop_matches_closed_form_and_numpy_average():
    """4000 steps at fixed w, decay 0.999: B_simple within 5% of 17; the averages are
    the bias-corrected moving averages of a plain numpy loop over the same norms."""
    steps, decay = 4000, 0.999
    tx = ow.track_noise_scale(B_SMALL, B_BIG, decay=decay)

    @jax.jit
    def run(key):
        def body(state, key):
            _, grads, small, big = by_group(W, *sample(key, B_BIG))
            _, state = tx.update(grads, state, small_sq_norm=small, big_sq_norm=big)
            return state, (small, big, ow.current_noise_scale(state))

        return jax.lax.scan(body, tx.init(W), jax.random.split(key, steps))

    state, (small, big, b_simple) = run(jax.random.key(1))
    np.testing.assert_allclose(ow.current_noise_scale(state), B_TRUE, rtol=0.05)
    assert int(state.count) == steps

    small, big = np.asarray(small, np.float64), np.asarray(big, np.float64)
    g2 = (B_BIG * big - B_SMALL * small) / (B_BIG - B_SMALL)
    trace_sigma = (small - big) / (1 / B_SMALL - 1 / B_BIG)
    m_g2 = m_trace = 0.0
    expected = []
    for t in range(steps):
        m_g2 = decay * m_g2 + (1 - decay) * g2[t]
        m_trace = decay * m_trace + (1 - decay) * trace_sigma[t]
        correction = 1 - decay ** (t + 1)
        expected.append((m_trace / correction) / (m_g2 / correction))
    np.testing.assert_allclose(b_simple, expected, rtol=2e-4)
    np.testing.assert_allclose(
        state.g2, m_g2 / (1 - decay**steps), rtol=2e-4, atol=1e-6
    )
    np.testing.assert_allclose(b_simple[0], trace_sigma[0] / g2[0], rtol=1e-5)


# --- noise_scale_estimates ---------------------------------------------------------


def test_estimates_match_the_formula():
    small, big = np.array([3.0, 2.5, 0.9]), np.array([1.5, 1.0, 1.0])
    g2, trace_sigma = ow.noise_scale_estimates(small, big, 8, 32)
    np.testing.assert_allclose(g2, (32 * big - 8 * small) / 24, rtol=1e-6)
    np.testing.assert_allclose(trace_sigma, (small - big) / (1 / 8 - 1 / 32), rtol=1e-6)
    assert g2.dtype == trace_sigma.dtype == jnp.float32
    assert float(trace_sigma[2]) < 0  # unbiased, not clipped


@settings(max_examples=50, deadline=None)
@given(
    g2=st.floats(0.0, 10.0),
    trace_sigma=st.floats(0.0, 1e3),
    b_small=st.integers(1, 512),
    factor=st.integers(2, 64),
)
def test_estimates_invert_the_expected_norms(g2, trace_sigma, b_small, factor):
    """E|G_B|² = |G|² + tr Σ / B at both sizes gives back |G|² and tr Σ."""
    b_big = b_small * factor
    small = g2 + trace_sigma / b_small
    big = g2 + trace_sigma / b_big
    with jax.enable_x64(True):
        got = ow.noise_scale_estimates(
            np.float64(small), np.float64(big), b_small, b_big
        )
    np.testing.assert_allclose(got, (g2, trace_sigma), rtol=1e-9, atol=1e-9)


def test_estimates_jit_equals_eager_and_vmap_over_norms_and_sizes():
    small, big = jnp.array([3.0, 2.0]), jnp.array([1.5, 0.5])
    eager = ow.noise_scale_estimates(small, big, 8, 32)
    jitted = jax.jit(ow.noise_scale_estimates, static_argnums=(2, 3))(small, big, 8, 32)
    traced = jax.jit(ow.noise_scale_estimates)(small, big, 8, 32)
    chex.assert_trees_all_close(eager, jitted, traced)
    mapped = jax.vmap(ow.noise_scale_estimates, in_axes=(0, 0, None, None))(
        small, big, 8, 32
    )
    chex.assert_trees_all_close(mapped, eager)
    sizes = jax.vmap(ow.noise_scale_estimates, in_axes=(None, None, 0, 0))(
        3.0, 1.5, jnp.array([8, 4]), jnp.array([32, 8])
    )
    expected = [ow.noise_scale_estimates(3.0, 1.5, s, b) for s, b in [(8, 32), (4, 8)]]
    chex.assert_trees_all_close(
        sizes, tuple(jnp.stack(e) for e in zip(*expected, strict=True))
    )


@pytest.mark.parametrize(
    ("b_small", "b_big", "match"),
    [
        (32, 32, "b_small must be smaller than b_big"),
        (64, 32, "b_small=64, b_big=32"),
        (0, 32, "b_small must be an integer >= 1"),
        (-4, 32, "b_small"),
        (8, 0, "b_big"),
        (2.5, 32, "b_small must be an integer, got 2.5"),
        (8, 16.5, "b_big must be an integer"),
        (8, float("nan"), "b_big"),
    ],
)
def test_bad_sizes_name_themselves(b_small, b_big, match):
    with pytest.raises(ValueError, match=match):
        ow.noise_scale_estimates(1.0, 0.5, b_small, b_big)
    with pytest.raises(ValueError, match=match):
        ow.track_noise_scale(b_small, b_big)


def test_sizes_of_the_wrong_type():
    with pytest.raises(TypeError, match="b_small"):
        ow.noise_scale_estimates(1.0, 0.5, "8", 32)
    assert ow.noise_scale_estimates(1.0, 0.5, 8.0, np.int64(32))[0] == 1 / 3


# --- average_group_grads and value_and_grad_by_group --------------------------------


def test_average_group_grads_against_a_numpy_loop():
    rng = np.random.default_rng(0)
    group_grads = {"a": rng.normal(size=(5, 3, 2)), "b": rng.normal(size=(5,))}
    grads, small, big = ow.average_group_grads(jax.tree.map(jnp.asarray, group_grads))
    per_group = [
        np.sum(group_grads["a"][j] ** 2) + group_grads["b"][j] ** 2 for j in range(5)
    ]
    mean = {k: v.mean(0) for k, v in group_grads.items()}
    np.testing.assert_allclose(small, np.mean(per_group), rtol=1e-5)
    np.testing.assert_allclose(big, np.sum(mean["a"] ** 2) + mean["b"] ** 2, rtol=1e-5)
    chex.assert_trees_all_close(grads, mean, rtol=1e-5)
    moved = jax.tree.map(lambda g: jnp.moveaxis(jnp.asarray(g), 0, -1), group_grads)
    chex.assert_trees_all_close(
        ow.average_group_grads(moved, group_axis=-1), (grads, small, big), rtol=1e-5
    )


def test_average_group_grads_keeps_bf16_and_needs_groups():
    group_grads = {"w": jnp.ones((4, 3), jnp.bfloat16)}
    grads, small, big = ow.average_group_grads(group_grads)
    assert grads["w"].dtype == jnp.bfloat16
    assert small.dtype == big.dtype == jnp.float32
    with pytest.raises(ValueError, match="group_axis=None, axis_name=None"):
        ow.average_group_grads(group_grads, group_axis=None)


def test_value_and_grad_by_group_equals_the_whole_batch():
    x, y = sample(jax.random.key(3), B_BIG)
    loss, grads, small, big = jax.jit(by_group)(W, x, y)
    full_loss, full_grads = jax.value_and_grad(regression_loss)(W, x, y)
    np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
    np.testing.assert_allclose(grads, full_grads, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(big, jnp.sum(full_grads**2), rtol=1e-5)
    group = [
        jax.grad(regression_loss)(W, x[i : i + B_SMALL], y[i : i + B_SMALL])
        for i in range(0, B_BIG, B_SMALL)
    ]
    np.testing.assert_allclose(
        small, np.mean([np.sum(np.square(g)) for g in group]), rtol=1e-5
    )
    grouped = ow.value_and_grad_by_group(regression_loss)  # batches already grouped
    chex.assert_trees_all_close(
        grouped(W, x.reshape(GROUPS, B_SMALL, D), y.reshape(GROUPS, B_SMALL)),
        (loss, grads, small, big),
        rtol=1e-6,
    )


def test_value_and_grad_by_group_aux_and_shared_arguments():
    x, y = sample(jax.random.key(4), 12)

    def loss_fn(w, scale, x, y):
        residual = scale * (x @ w - y)
        return 0.5 * jnp.mean(residual**2), {"residual": residual}

    fn = ow.value_and_grad_by_group(
        loss_fn, group_size=4, has_aux=True, batch_argnums=(2, 3)
    )
    (loss, aux), grads, _, _ = fn(W, 2.0, x, y)
    assert aux["residual"].shape == (3, 4)  # stacked per group
    np.testing.assert_allclose(
        aux["residual"].reshape(-1), 2.0 * (x @ W - y), rtol=1e-5
    )
    full = jax.grad(lambda w: loss_fn(w, 2.0, x, y)[0])(W)
    np.testing.assert_allclose(grads, full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss, loss_fn(W, 2.0, x, y)[0], rtol=1e-6)


def test_value_and_grad_by_group_bad_arguments():
    x, y = sample(jax.random.key(5), 12)
    with pytest.raises(ValueError, match="group_size=5 must divide"):
        ow.value_and_grad_by_group(regression_loss, group_size=5)(W, x, y)
    with pytest.raises(ValueError, match="group_size=5 must divide"):
        jax.jit(ow.value_and_grad_by_group(regression_loss, group_size=5))(W, x, y)
    with pytest.raises(ValueError, match="group_size must be an integer >= 1"):
        ow.value_and_grad_by_group(regression_loss, group_size=0)
    with pytest.raises(ValueError, match="batch_argnums must not include 0"):
        ow.value_and_grad_by_group(regression_loss, batch_argnums=(0, 1))


def ghost_model(dtype=jnp.float32):
    return ow.models.SmallResNet1D(
        widths=(4, 8, 8),
        batch_norm_group_size=8,
        param_dtype=dtype,
        rngs=nnx.Rngs(0),
    )


@pytest.mark.slow  # compiles a ResNet's gradient vmapped over its groups
def test_ghost_batch_norm_groups_give_the_whole_batch_gradient_and_statistics():
    """vmap over the ghost BatchNorm groups: the mean of the groups' gradients and of
    their updated running statistics are those of the whole batch (float32; flax
    keeps running statistics in float32 whatever the parameters' dtype)."""
    model = ghost_model()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (32, 40, 1))
    y = jax.random.randint(jax.random.key(2), (32,), 0, 10)

    def loss_fn(params, x, y):
        model = nnx.merge(graphdef, params, rest, copy=True)
        loss = ow.smoothed_cross_entropy(model(x), y, alpha=0.1).mean()
        return loss, nnx.state(model, nnx.BatchStat)

    whole = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, stats), grads = whole(params, x, y)
    fn = ow.value_and_grad_by_group(loss_fn, group_size=8, has_aux=True)
    (group_loss, group_stats), group_mean, small, big = jax.jit(fn)(params, x, y)
    assert len(jax.tree.leaves(stats)) == 18  # mean and var of 9 BatchNorms
    np.testing.assert_allclose(group_loss, loss, rtol=1e-6)
    chex.assert_trees_all_close(group_mean, grads, rtol=1e-4, atol=1e-7)
    chex.assert_trees_all_close(
        jax.tree.map(lambda s: s.mean(0), group_stats), stats, rtol=1e-5, atol=1e-7
    )
    assert float(small) > float(big) > 0


# --- the tracker as an optax transformation ----------------------------------------

CONFIG = dict(batch_size=1024, steps_per_epoch=5, warmup_epochs=1, milestones=(2,))


def regression_steps(tx, steps=6, key=1):
    """Trains w on the regression; returns the updates and the final state."""
    w, state, seen = jnp.zeros(D), tx.init(jnp.zeros(D)), []
    for t in range(steps):
        _, grads, small, big = by_group(w, *sample(jax.random.key(key + t), B_BIG))
        updates, state = tx.update(
            grads, state, w, small_sq_norm=small, big_sq_norm=big
        )
        w = optax.apply_updates(w, updates)
        seen.append(updates)
    return seen, state


def test_tracker_leaves_updates_unchanged_before_or_after_a_recipe():
    plain, plain_state = regression_steps(ow.goyal_sgd(**CONFIG))
    before, before_state = regression_steps(
        optax.chain(ow.track_noise_scale(B_SMALL, B_BIG), ow.goyal_sgd(**CONFIG))
    )
    after, after_state = regression_steps(
        optax.chain(ow.goyal_sgd(**CONFIG), ow.track_noise_scale(B_SMALL, B_BIG))
    )
    chex.assert_trees_all_equal(plain, before, after)
    np.testing.assert_allclose(
        ow.current_lr(before_state), ow.current_lr(plain_state), rtol=0
    )
    b_simple = ow.current_noise_scale(before_state)
    assert np.isfinite(b_simple) and b_simple > 0
    np.testing.assert_array_equal(b_simple, ow.current_noise_scale(after_state))
    assert int(before_state[0].count) == 6


def test_tracker_inside_inject_hyperparams_multisteps_and_with_plateau():
    injected = optax.inject_hyperparams(
        lambda learning_rate: optax.chain(
            ow.track_noise_scale(B_SMALL, B_BIG), optax.sgd(learning_rate)
        )
    )(learning_rate=0.1)
    _, state = regression_steps(injected, steps=3)
    assert int(state.inner_state[0].count) == 3
    np.testing.assert_allclose(ow.current_lr(state), 0.1, rtol=1e-6)

    multi = optax.MultiSteps(
        optax.chain(ow.track_noise_scale(B_SMALL, B_BIG), optax.sgd(0.1)), 2
    )
    _, state = regression_steps(multi, steps=5)
    assert int(state.inner_opt_state[0].count) == 2  # once per 2 micro-batches
    assert np.isfinite(ow.current_noise_scale(state))

    plateau = optax.chain(
        ow.track_noise_scale(B_SMALL, B_BIG),
        ow.goyal_sgd(**CONFIG),
        ow.reduce_on_plateau_after(2),
    )
    state = plateau.init(W)
    _, grads, small, big = by_group(W, *sample(jax.random.key(0), B_BIG))
    _, state = plateau.update(
        grads, state, W, small_sq_norm=small, big_sq_norm=big, value=1.0
    )
    assert int(state[0].count) == 1


def test_update_without_norms_is_an_error():
    tx = optax.chain(ow.track_noise_scale(B_SMALL, B_BIG), ow.goyal_sgd(**CONFIG))
    state = tx.init(W)
    with pytest.raises(TypeError, match="missing small_sq_norm, big_sq_norm"):
        tx.update(W, state, W)
    with pytest.raises(TypeError, match="missing big_sq_norm"):
        tx.update(W, state, W, small_sq_norm=1.0)
    with pytest.raises(ValueError, match=r"small_sq_norm must be a scalar.*\(3,\)"):
        tx.update(W, state, W, small_sq_norm=jnp.ones(3), big_sq_norm=1.0)


@pytest.mark.parametrize("decay", [1.0, -0.1, float("nan"), 1.5])
def test_bad_decay_names_itself(decay):
    with pytest.raises(ValueError, match="decay"):
        ow.track_noise_scale(B_SMALL, B_BIG, decay=decay)


def test_state_jit_equals_eager_no_retrace_and_nan_before_first_update():
    tx = ow.track_noise_scale(8, 32, decay=0.9)
    state = tx.init(W)
    assert state.count.dtype == jnp.int32 and state.g2.dtype == jnp.float32
    assert np.isnan(ow.current_noise_scale(state))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def update(state, small, big):
        return tx.update(W, state, small_sq_norm=small, big_sq_norm=big)[1]

    eager = jitted = state
    for small, big in [(3.0, 1.5), (2.0, 0.5), (4.0, 1.0)]:
        eager = tx.update(W, eager, small_sq_norm=small, big_sq_norm=big)[1]
        jitted = update(jitted, jnp.float32(small), jnp.float32(big))
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6)
    np.testing.assert_allclose(
        jax.jit(ow.current_noise_scale)(jitted),
        ow.current_noise_scale(eager),
        rtol=1e-6,
    )
    # the first estimate is read unbiased: (tr Σ, |G|²) = (16, 1)
    first = tx.update(W, state, small_sq_norm=3.0, big_sq_norm=1.5)[1]
    assert float(first.g2) == 1.0 and float(first.trace_sigma) == 16.0
    saturated = state._replace(count=jnp.int32(2**31 - 1))
    after = tx.update(W, saturated, small_sq_norm=3.0, big_sq_norm=1.5)[1]
    assert int(after.count) == 2**31 - 1  # saturates, never wraps


def test_vmap_over_tracker_updates():
    tx = ow.track_noise_scale(8, 32)
    states = jax.vmap(
        lambda s, b: tx.update({}, tx.init({}), small_sq_norm=s, big_sq_norm=b)[1]
    )(jnp.array([3.0, 2.0]), jnp.array([1.5, 0.5]))
    np.testing.assert_allclose(jax.vmap(ow.current_noise_scale)(states), [16.0, np.inf])


def test_current_noise_scale_errors():
    with pytest.raises(ValueError, match=r"no NoiseScaleState.*track_noise_scale"):
        ow.current_noise_scale(ow.goyal_sgd(**CONFIG).init(W))
    two = optax.chain(
        ow.track_noise_scale(B_SMALL, B_BIG), ow.track_noise_scale(B_SMALL, B_BIG)
    )
    with pytest.raises(ValueError, match=r"found 2 NoiseScaleStates.*at 0, 1"):
        ow.current_noise_scale(two.init(W))
    assert np.isnan(ow.current_noise_scale(two.init(W)[1]))


# --- Flax -------------------------------------------------------------------------


@pytest.mark.slow  # compiles a ResNet's gradient vmapped over its groups
def test_nnx_optimizer_gets_the_norms_through_update():
    model = ghost_model()
    tx = optax.chain(ow.track_noise_scale(8, 32), ow.goyal_sgd(**CONFIG))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (32, 40, 1))
    y = jax.random.randint(jax.random.key(2), (32,), 0, 10)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_fn(params, x, y):
            model = nnx.merge(graphdef, params, rest, copy=True)
            loss = ow.smoothed_cross_entropy(model(x), y, alpha=0.1).mean()
            return loss, nnx.state(model, nnx.BatchStat)

        by_group = ow.value_and_grad_by_group(loss_fn, group_size=8, has_aux=True)
        (loss, stats), grads, small, big = by_group(params, x, y)
        nnx.update(model, jax.tree.map(lambda s: s.mean(0), stats))
        optimizer.update(model, grads, small_sq_norm=small, big_sq_norm=big)
        return loss, small, big

    norms = [train_step(model, optimizer, x, y)[1:] for _ in range(3)]
    twin = ow.track_noise_scale(8, 32)
    state = twin.init({})
    for small, big in norms:
        state = twin.update({}, state, small_sq_norm=small, big_sq_norm=big)[1]
    expected = ow.current_noise_scale(state)
    np.testing.assert_allclose(ow.current_noise_scale(optimizer), expected, rtol=1e-6)
    np.testing.assert_allclose(
        ow.current_noise_scale(optimizer.opt_state), expected, rtol=1e-6
    )
    assert int(optimizer.step[...]) == 3


def test_train_state_passes_the_norms_by_hand():
    tx = optax.chain(ow.track_noise_scale(B_SMALL, B_BIG), ow.goyal_sgd(**CONFIG))
    params = {"kernel": jnp.zeros(D)}
    ts = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
    fn = ow.value_and_grad_by_group(
        lambda p, x, y: regression_loss(p["kernel"], x, y), group_size=B_SMALL
    )
    _, grads, small, big = fn(ts.params, *sample(jax.random.key(0), B_BIG))
    with pytest.raises(TypeError, match="small_sq_norm"):
        ts.apply_gradients(grads=grads)  # TrainState passes no extra arguments
    updates, opt_state = ts.tx.update(
        grads, ts.opt_state, ts.params, small_sq_norm=small, big_sq_norm=big
    )
    ts = ts.replace(
        step=ts.step + 1,
        params=optax.apply_updates(ts.params, updates),
        opt_state=opt_state,
    )
    g2, trace_sigma = ow.noise_scale_estimates(small, big, B_SMALL, B_BIG)
    np.testing.assert_allclose(ow.current_noise_scale(ts), trace_sigma / g2, rtol=1e-6)


# --- fresh processes: orbax and the mesh --------------------------------------------


def run_script(source, *args, env=None):
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


CHECKPOINT_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np, optax
import orbax.checkpoint as ocp
import optax_warmup as ow

mode, directory, out = sys.argv[1:4]
TOTAL, SAVE_AT, D = 12, 5, 8
recipe = ow.goyal_sgd(batch_size=64, steps_per_epoch=2, warmup_epochs=2,
                      milestones=(4,))
tx = optax.chain(ow.track_noise_scale(8, 64, decay=0.8), recipe)
w_star = jnp.arange(D, dtype=jnp.float32) / D

def loss_fn(w, x, y):
    return 0.5 * jnp.mean((x @ w - y) ** 2)

by_group = ow.value_and_grad_by_group(loss_fn, group_size=8)

@jax.jit
def step(w, opt_state, t):
    key = jax.random.fold_in(jax.random.key(1), t)
    x = jax.random.normal(key, (64, D))
    y = x @ w_star + jax.random.normal(jax.random.fold_in(key, 1), (64,))
    _, grads, small, big = by_group(w, x, y)
    updates, opt_state = tx.update(grads, opt_state, w,
                                   small_sq_norm=small, big_sq_norm=big)
    return optax.apply_updates(w, updates), opt_state

checkpointer = ocp.StandardCheckpointer()
if mode == "first":
    w = jnp.zeros(D)
    opt_state, start = tx.init(w), 0
else:
    target = jax.eval_shape(lambda: {"w": jnp.zeros(D),
                                     "opt_state": tx.init(jnp.zeros(D))})
    restored = checkpointer.restore(directory, target)
    w, opt_state, start = restored["w"], restored["opt_state"], SAVE_AT
scales = []
for t in range(start, TOTAL):
    if mode == "first" and t == SAVE_AT:
        checkpointer.save(directory, {"w": w, "opt_state": opt_state})
        checkpointer.wait_until_finished()
    w, opt_state = step(w, opt_state, t)
    scales.append(float(ow.current_noise_scale(opt_state)))
np.savez(out, scales=np.asarray(scales), w=np.asarray(w),
         count=np.asarray(opt_state[0].count), g2=np.asarray(opt_state[0].g2))
"""


@pytest.mark.slow
def test_orbax_checkpoint_resumes_the_averages_in_a_fresh_process(tmp_path):
    directory = tmp_path / "checkpoint"
    run_script(CHECKPOINT_SCRIPT, "first", directory, tmp_path / "first.npz")
    run_script(CHECKPOINT_SCRIPT, "resume", directory, tmp_path / "resumed.npz")
    first = np.load(tmp_path / "first.npz")
    resumed = np.load(tmp_path / "resumed.npz")
    np.testing.assert_array_equal(first["scales"][5:], resumed["scales"])
    assert np.isfinite(first["scales"]).all()
    assert int(first["count"]) == int(resumed["count"]) == 12
    np.testing.assert_array_equal(first["g2"], resumed["g2"])
    np.testing.assert_array_equal(first["w"], resumed["w"])


MESH_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import optax_warmup as ow

assert jax.device_count() == 8, jax.devices()
N, GROUP = 64, 8
mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
model = ow.models.SmallResNet1D(widths=(4, 8, 8), batch_norm_group_size=GROUP,
                                rngs=nnx.Rngs(0))
graphdef, params, rest = nnx.split(model, nnx.Param, ...)
tx = optax.chain(ow.track_noise_scale(GROUP, N),
                 ow.goyal_sgd(batch_size=N, steps_per_epoch=4, warmup_epochs=1,
                             milestones=(2,)))
x = jax.random.normal(jax.random.key(1), (N, 40, 1))
y = jax.random.randint(jax.random.key(2), (N,), 0, 10)

def loss_fn(params, rest, x, y):
    model = nnx.merge(graphdef, params, rest, copy=True)
    loss = ow.smoothed_cross_entropy(model(x), y, alpha=0.1).mean()
    return loss, nnx.state(model, nnx.Not(nnx.Param))

def finish(params, opt_state, stats, grads, small, big):
    rest = jax.tree.map(lambda s: s.mean(0), stats)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   small_sq_norm=small, big_sq_norm=big)
    return optax.apply_updates(params, updates), rest, opt_state

@jax.jit
def vmapped_step(params, rest, opt_state, x, y):
    fn = ow.value_and_grad_by_group(loss_fn, group_size=GROUP, has_aux=True,
                                    batch_argnums=(2, 3))
    (_, stats), grads, small, big = fn(params, rest, x, y)
    return finish(params, opt_state, stats, grads, small, big)

def per_device(params, rest, x, y):  # each device's 8 examples are one group
    # Replicated params would get the gradient summed over the devices: make them
    # device-varying so that each device differentiates its own group's loss.
    params = jax.lax.pcast(params, "data", to="varying")
    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, x, y)
    grads, small, big = ow.average_group_grads(grads, group_axis=None,
                                               axis_name="data")
    stats = jax.tree.map(lambda s: jax.lax.pmean(s, "data")[None], stats)
    return stats, grads, small, big

@jax.jit
def shard_map_step(params, rest, opt_state, x, y):
    stats, grads, small, big = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
        out_specs=P())(params, rest, x, y)
    return finish(params, opt_state, stats, grads, small, big)

def run(step, shard):
    carry, bx, by = (params, rest, tx.init(params)), x, y
    if shard:
        carry = jax.device_put(carry, NamedSharding(mesh, P()))
        bx = jax.device_put(x, NamedSharding(mesh, P("data")))
        by = jax.device_put(y, NamedSharding(mesh, P("data")))
    scales = []
    for _ in range(4):
        carry = step(*carry, bx, by)
        scales.append(float(ow.current_noise_scale(carry[2])))
    return carry, np.asarray(scales)

single, single_scales = run(vmapped_step, False)
assert np.isfinite(single_scales).all(), single_scales
for step in (vmapped_step, shard_map_step):
    sharded, scales = run(step, True)
    np.testing.assert_allclose(scales, single_scales, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(single[:2]), jax.tree.leaves(sharded[:2])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
print("ok", single_scales)
"""


@pytest.mark.slow
def test_8_device_mesh_gives_the_single_device_values():
    """The batch sharded over 8 devices: vmap over groups under jit, and shard_map
    with each device's gradients as a group, match one device."""
    result = run_script(
        MESH_SCRIPT,
        env={
            "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
            "JAX_PLATFORMS": "cpu",
        },
    )
    assert "ok" in result.stdout
