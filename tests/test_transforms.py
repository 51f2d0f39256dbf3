"""scale_by_warmup and current_lr."""

import itertools
import math
import unittest.mock
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_warmup as ow


def reference_factor(t, warmup_steps, shape="linear", init_value=0.0):
    """The warmup factor, written plainly."""
    if t >= warmup_steps:
        return 1.0
    f = t / warmup_steps
    if shape == "linear":
        return init_value + (1.0 - init_value) * f
    if shape == "cosine":
        return init_value + (1.0 - init_value) * 0.5 * (1.0 - math.cos(math.pi * f))
    if shape == "exponential":
        return init_value * (1.0 / init_value) ** f
    return init_value  # constant


def run_factors(tx, steps, dtype=jnp.float32):
    """The factor applied at each of ``steps`` updates of a ones-gradient."""
    params = {"w": jnp.zeros((), dtype)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    factors = []
    for _ in range(steps):
        updates, state = update({"w": jnp.ones((), dtype)}, state)
        factors.append(float(updates["w"]))
    return factors, state


@pytest.mark.parametrize(
    ("shape", "init_value"),
    [
        ("linear", 0.0),
        ("linear", 0.25),
        ("cosine", 0.0),
        ("constant", 0.1),
        ("exponential", 0.01),
    ],
)
def test_factor_matches_reference(shape, init_value):
    factors, state = run_factors(
        ow.scale_by_warmup(8, shape=shape, init_value=init_value), 12
    )
    expected = [reference_factor(t, 8, shape, init_value) for t in range(12)]
    np.testing.assert_allclose(factors, expected, rtol=1e-6, atol=1e-7)
    assert state.count.dtype == jnp.int32 and int(state.count) == 12
    assert state.factor.dtype == jnp.float32 and float(state.factor) == 1.0


def test_edges_step_zero_handoff_and_no_warmup():
    factors, _ = run_factors(ow.scale_by_warmup(4), 6)
    assert factors[0] == 0.0  # the first update is zero: warmup from 0
    assert factors[3] == 0.75 and factors[4] == 1.0  # count W is the first at 1
    factors, _ = run_factors(ow.scale_by_warmup(0), 3)
    assert factors == [1.0, 1.0, 1.0]


def test_init_state_and_saturating_count():
    tx = ow.scale_by_warmup(10, init_value=0.5)
    state = tx.init({"w": jnp.zeros(3)})
    assert isinstance(state, ow.ScaleByWarmupState)
    assert state.count.dtype == jnp.int32 and int(state.count) == 0
    assert float(state.factor) == 0.5  # the factor the first update will use
    top = jnp.iinfo(jnp.int32).max
    state = ow.ScaleByWarmupState(jnp.asarray(top, jnp.int32), state.factor)
    updates, state = tx.update({"w": jnp.ones(3)}, state)
    assert int(state.count) == top  # saturates, never wraps to a negative count
    np.testing.assert_array_equal(updates["w"], 1.0)


def test_factor_schedule_untuned_warmup():
    b2 = 0.9  # tau = 2 / (1 - b2) = 20 steps
    factors, _ = run_factors(ow.scale_by_warmup(ow.untuned_warmup_schedule(b2)), 25)
    expected = [min(1.0, (t + 1) * (1 - b2) / 2) for t in range(25)]
    np.testing.assert_allclose(factors, expected, rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 50), st.floats(0.0, 1.0))
def test_factor_monotone_and_bounded_property(warmup_steps, init_value):
    tx = ow.scale_by_warmup(warmup_steps, init_value=init_value)
    state = tx.init(jnp.zeros(()))
    factors = []
    for _ in range(warmup_steps + 2):
        update, state = tx.update(jnp.ones(()), state)
        factors.append(float(update))
    assert all(b >= a for a, b in itertools.pairwise(factors))
    assert all(init_value - 1e-6 <= f <= 1.0 for f in factors)
    assert factors[-1] == 1.0


def test_chain_with_adam_equals_scheduled_adam():
    warmup = 5
    tx = optax.chain(optax.adam(1e-2), ow.scale_by_warmup(warmup))
    expected_tx = optax.adam(lambda t: 1e-2 * jnp.minimum(t / warmup, 1.0))
    params = {"w": jnp.arange(4.0)}
    s1, s2 = tx.init(params), expected_tx.init(params)
    for t in range(8):
        grads = {"w": jnp.sin(jnp.arange(4.0) + t)}
        u1, s1 = tx.update(grads, s1)
        u2, s2 = expected_tx.update(grads, s2)
        chex.assert_trees_all_close(u1, u2, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_updates_keep_dtype(dtype):
    tx = ow.scale_by_warmup(4)
    params = {"w": jnp.ones(3, dtype), "b": jnp.ones((), dtype)}
    updates, state = jax.jit(tx.update)(params, tx.init(params))
    updates, state = jax.jit(tx.update)(params, state)
    assert jax.tree.map(lambda u: u.dtype, updates) == {"w": dtype, "b": dtype}
    np.testing.assert_allclose(np.asarray(updates["w"], np.float32), 0.25)


def test_jit_equals_eager_and_no_retrace():
    tx = optax.chain(optax.sgd(0.1, momentum=0.9), ow.scale_by_warmup(3))
    params = {"w": jnp.arange(3.0)}
    grads = {"w": jnp.ones(3)}

    @jax.jit
    @chex.assert_max_traces(n=1)
    def jitted(state):
        return tx.update(grads, state)

    s_eager = s_jit = tx.init(params)
    for _ in range(5):
        u_eager, s_eager = tx.update(grads, s_eager)
        u_jit, s_jit = jitted(s_jit)
        chex.assert_trees_all_close(u_eager, u_jit, rtol=1e-6)
    # grad through the update is finite.
    g = jax.grad(lambda x: tx.update({"w": x}, s_eager)[0]["w"].sum())(jnp.ones(3))
    assert np.all(np.isfinite(g))


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="warmup_steps"):
        ow.scale_by_warmup(-1)
    with pytest.raises(ValueError, match="warmup_steps"):
        ow.scale_by_warmup(2.5)
    with pytest.raises(ValueError, match="shape"):
        ow.scale_by_warmup(10, shape="triangle")
    with pytest.raises(ValueError, match="init_value"):
        ow.scale_by_warmup(10, init_value=1.5)
    with pytest.raises(ValueError, match="init_value"):
        ow.scale_by_warmup(10, shape="exponential", init_value=0.0)
    with pytest.raises(ValueError, match="shape and init_value"):
        ow.scale_by_warmup(ow.untuned_warmup_schedule(), shape="cosine")


# current_lr ---------------------------------------------------------------------


def injected_sgd(schedule):
    return optax.inject_hyperparams(optax.sgd)(learning_rate=schedule, momentum=0.9)


SCHEDULE = optax.linear_schedule(0.0, 1.0, 10)  # 0.1 per step


def advance(tx, params, steps):
    state = tx.init(params)
    for _ in range(steps):
        _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    return state


def test_current_lr_where_optax_tree_get_fails():
    params = {"w": jnp.ones((2, 2))}
    tx = optax.chain(optax.add_decayed_weights(1e-4), injected_sgd(SCHEDULE))
    state = advance(tx, params, 4)
    with pytest.raises(KeyError, match="multiple values"):
        optax.tree.get(state, "learning_rate")
    # The most recent (4th) update used the schedule at count 3.
    np.testing.assert_allclose(ow.current_lr(state), 0.3, rtol=1e-6)
    assert ow.current_lr(tx.init(params)) == 0.0  # at init: the first update's


def test_current_lr_in_multisteps_counts_optimizer_steps():
    params = {"w": jnp.ones((2, 2))}
    tx = optax.MultiSteps(injected_sgd(SCHEDULE), every_k_schedule=3)
    state = tx.init(params)
    update = jax.jit(tx.update)  # eager, its lax.cond compiles at every step
    lrs = []
    for _ in range(9):
        _, state = update({"w": jnp.ones((2, 2))}, state, params)
        lrs.append(float(ow.current_lr(state)))
    np.testing.assert_allclose(lrs, [0, 0, 0, 0, 0, 0.1, 0.1, 0.1, 0.2], atol=1e-7)


def test_current_lr_with_nnx_optimizer_and_train_state():
    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(
        model, optax.chain(optax.clip(1.0), injected_sgd(SCHEDULE)), wrt=nnx.Param
    )
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    for _ in range(3):
        opt.update(model, grads)
    np.testing.assert_allclose(ow.current_lr(opt.opt_state), 0.2, rtol=1e-6)
    np.testing.assert_allclose(ow.current_lr(opt), 0.2, rtol=1e-6)
    ts = train_state.TrainState.create(
        apply_fn=None, params={"w": jnp.ones(2)}, tx=injected_sgd(SCHEDULE)
    )
    for _ in range(2):
        ts = ts.apply_gradients(grads={"w": jnp.ones(2)})
    np.testing.assert_allclose(ow.current_lr(ts), 0.1, rtol=1e-6)
    np.testing.assert_allclose(ow.current_lr(ts.opt_state), 0.1, rtol=1e-6)


def test_current_lr_includes_warmup_factor_and_works_under_jit():
    tx = optax.chain(injected_sgd(0.5), ow.scale_by_warmup(4))
    params = {"w": jnp.ones(2)}
    state = advance(tx, params, 3)
    np.testing.assert_allclose(ow.current_lr(state), 0.5 * 2 / 4, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(ow.current_lr)(state), 0.25, rtol=1e-6)


def test_current_lr_errors():
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"no learning rate.*inject_hyperparams"):
        ow.current_lr(optax.sgd(0.1).init(params))
    with pytest.raises(ValueError, match="no learning rate"):
        ow.current_lr(optax.chain(optax.adam(1e-3), ow.scale_by_warmup(3)).init({}))
    two = optax.multi_transform(
        {"a": injected_sgd(0.1), "b": injected_sgd(0.2)}, {"w": "a", "v": "b"}
    )
    with pytest.raises(ValueError, match="2 learning rates"):
        ow.current_lr(two.init({"w": jnp.ones(2), "v": jnp.ones(2)}))


def test_current_lr_of_an_integer_rate_is_a_float():
    # An integer rate (1, 2) gives float updates; current_lr reports the same rate.
    tx = optax.chain(ow.sgd(1, weight_decay=0, momentum=0.0), ow.scale_by_warmup(4))
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    rates, steps = [], []
    for _ in range(3):
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        rates.append(float(ow.current_lr(state)))
        steps.append(float(updates["w"]))
    assert steps == [0.0, -0.25, -0.5]
    assert rates == [0.0, 0.25, 0.5]
    hyperparams = state[0].hyperparams
    assert hyperparams["learning_rate"].dtype == jnp.float32
    assert hyperparams["weight_decay"].dtype == jnp.float32
    injected = optax.inject_hyperparams(optax.sgd)(learning_rate=2)
    updates, state = injected.update({"w": jnp.ones(())}, injected.init(params))
    assert float(updates["w"]) == -2.0
    lr = ow.current_lr(state)
    assert lr.dtype == jnp.float32 and float(lr) == 2.0
    lr = ow.current_lr(optax.chain(injected, ow.scale_by_warmup(4)).init(params))
    assert lr.dtype == jnp.float32 and float(lr) == 0.0


def test_current_lr_multiplies_in_an_optax_linesearch_step():
    def value_fn(params):
        return jnp.sum(params["w"] ** 2)

    tx = optax.chain(
        ow.sgd(1.0, weight_decay=0.0, momentum=0.0),
        optax.scale_by_backtracking_linesearch(max_backtracking_steps=15),
    )
    params = {"w": jnp.full(2, 3.0)}
    state = tx.init(params)
    value, grad = jax.value_and_grad(value_fn)(params)
    updates, state = tx.update(
        grad, state, params, value=value, grad=grad, value_fn=value_fn
    )
    factor = float(state[1].learning_rate)
    assert factor < 1.0  # the line search shortened the step: 1·(6, 6) overshoots
    np.testing.assert_allclose(ow.current_lr(state), factor, rtol=1e-6)
    np.testing.assert_allclose(updates["w"], -factor * grad["w"], rtol=1e-6)


def test_current_lr_refuses_a_factor_it_cannot_read():
    params = {"w": jnp.ones(2)}
    schedule = optax.linear_schedule(0.0, 1.0, 10)
    # optax's scale_by_schedule keeps only a count: its factor cannot be read back.
    tx = optax.chain(ow.sgd(0.1), optax.scale_by_schedule(schedule))
    state = advance(tx, params, 6)  # the 6th update used 0.1 · 0.5 = 0.05
    with pytest.raises(
        ValueError, match=r"ScaleByScheduleState at '1'.*scale_by_warmup"
    ):
        ow.current_lr(state)
    np.testing.assert_allclose(ow.current_lr(state[0]), 0.1)  # the sub-state alone
    # ow.scale_by_warmup(schedule) keeps the factor it used: read and multiplied in.
    tx = optax.chain(ow.sgd(0.1), ow.scale_by_warmup(schedule))
    np.testing.assert_allclose(ow.current_lr(advance(tx, params, 6)), 0.05, rtol=1e-6)
    # An optax optimizer with a schedule but no inject_hyperparams: the same error.
    with pytest.raises(ValueError, match=r"ScaleByScheduleState at '\d+'"):
        ow.current_lr(optax.sgd(schedule).init(params))


def test_current_lr_reads_states_registered_in_its_table():
    from optax_warmup import _transforms

    class Authoritative(NamedTuple):  # a wrapper that sets the rate of all below it
        learning_rate: jax.Array
        inner: Any

    class Wrapper(NamedTuple):  # a wrapper to look through
        inner: Any
        count: jax.Array

    inner = optax.chain(injected_sgd(0.5), ow.scale_by_warmup(4))
    inner_state = advance(inner, {"w": jnp.ones(2)}, 3)  # 0.5 · 2/4
    readers = {
        Authoritative: lambda s: _transforms.RateReading(rate=s.learning_rate),
        Wrapper: lambda s: _transforms.RateReading(inner="inner"),
    }
    with unittest.mock.patch.dict(_transforms.RATE_READERS, readers):
        wrapped = Wrapper(inner_state, jnp.zeros([], jnp.int32))
        np.testing.assert_allclose(ow.current_lr(wrapped), 0.25, rtol=1e-6)
        state = Authoritative(jnp.asarray(0.7), inner_state)
        np.testing.assert_allclose(ow.current_lr(state), 0.7, rtol=1e-6)
        state = optax.chain(optax.clip(1.0), ow.scale_by_warmup(2)).init({})
        state = (Authoritative(jnp.asarray(0.7), inner_state), *state)
        np.testing.assert_allclose(ow.current_lr(state), 0.0, rtol=1e-6)
