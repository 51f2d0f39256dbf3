"""reduce_on_plateau_after: the warmup is ignored, cuts apply from the next update,
and after the warmup the decisions are optax's reduce_on_plateau's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from flax import nnx

import optax_warmup as ow


def scales(tx, losses, params=None):
    """The factor each update applied to a gradient of ones, and the final state."""
    params = {"w": jnp.zeros(3)} if params is None else params
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for loss in losses:
        updates, state = update({"w": jnp.ones(3)}, state, params, value=loss)
        out.append(float(updates["w"][0]))
    return np.array(out), state


def test_losses_during_warmup_are_ignored_where_optax_cuts():
    rising = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # a warmup can hold the loss up
    ours, _ = scales(ow.reduce_on_plateau_after(6, patience=2), rising)
    np.testing.assert_array_equal(ours, 1.0)
    theirs, _ = scales(optax.contrib.reduce_on_plateau(patience=2), rising)
    assert theirs[-1] == pytest.approx(0.01, rel=1e-6)  # optax alone: two cuts


@pytest.mark.parametrize(
    "settings",
    [
        dict(patience=2),
        dict(patience=3, factor=0.5, cooldown=2),
        dict(patience=1, accumulation_size=2, min_scale=0.05),
        dict(patience=2, rtol=0.0, atol=0.5),
    ],
)
def test_after_warmup_it_decides_as_optax_and_applies_one_update_later(settings):
    warmup = 4
    rng = np.random.default_rng(0)
    after = list(np.maximum.accumulate(rng.uniform(0.5, 1.0, 30))[::-1])
    after[10:] = [after[10]] * 20  # a long plateau: several cuts
    losses = [9.0] * warmup + after
    ours, state = scales(ow.reduce_on_plateau_after(warmup, **settings), losses)
    theirs, _ = scales(optax.contrib.reduce_on_plateau(**settings), after)
    np.testing.assert_array_equal(ours[:warmup], 1.0)
    # optax applies a cut to the update that decided it; ours from the next one.
    np.testing.assert_allclose(ours[warmup + 1 :], theirs[:-1], rtol=1e-6)
    assert ours[warmup] == 1.0
    assert len(set(theirs)) > 2  # the check saw more than one cut
    assert float(state.scale) == pytest.approx(ours[-1])
    assert int(state.count) == len(losses)


def test_current_lr_is_the_schedule_times_the_scale_in_a_jitted_nnx_step():
    warmup, total = 5, 40
    schedule = ow.warmup_schedule(0.05, warmup)
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    tx = optax.chain(
        ow.sgd(schedule, weight_decay=0.0),
        ow.reduce_on_plateau_after(warmup, patience=3, factor=0.5),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(0), (64, 3))
    y = x @ jnp.array([[1.0], [-2.0], [0.5]]) + 0.3 * jax.random.normal(
        jax.random.key(1), (64, 1)
    )

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads, value=loss)
        return loss

    rates, applied = [], []
    for t in range(total):
        step(model, optimizer)
        plateau = optimizer.opt_state[1]
        applied.append(float(plateau.scale))
        rates.append(float(ow.current_lr(optimizer)))
        np.testing.assert_allclose(rates[-1], schedule(t) * applied[-1], rtol=1e-6)
    assert min(applied) < 1.0  # the noisy loss plateaued: the rate was cut
    assert applied[: warmup + 1] == [1.0] * (warmup + 1)


def test_update_without_the_loss_is_a_type_error():
    tx = ow.reduce_on_plateau_after(3)
    params = {"w": jnp.zeros(2)}
    with pytest.raises(TypeError, match="value"):
        tx.update(params, tx.init(params), params)


def test_low_precision_updates_keep_their_dtype():
    params = {"w": jnp.zeros(3, jnp.bfloat16)}
    tx = ow.reduce_on_plateau_after(0, patience=1)
    state = tx.init(params)
    for loss in (1.0, 1.0, 1.0):
        updates, state = tx.update({"w": jnp.ones(3, jnp.bfloat16)}, state, value=loss)
        assert updates["w"].dtype == jnp.bfloat16
    assert state.scale.dtype == jnp.float32


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("warmup_steps", -1),
        ("warmup_steps", 2.5),
        ("factor", 1.0),
        ("factor", 0.0),
        ("patience", 0),
        ("rtol", -0.1),
        ("atol", float("nan")),
        ("cooldown", -1),
        ("accumulation_size", 0),
        ("min_scale", 1.5),
    ],
)
def test_bad_arguments_name_themselves(argument, value):
    kwargs = {"warmup_steps": 10, argument: value}
    with pytest.raises(ValueError, match=argument):
        ow.reduce_on_plateau_after(**kwargs)
    with pytest.raises(ValueError, match="rtol or atol"):
        ow.reduce_on_plateau_after(10, rtol=0.0, atol=0.0)
