"""AdaScale (Johnson et al. 2020): a rate that adapts to the batch, and its clock.

At a batch ``S`` times the reference batch, AdaScale multiplies the learning rate by
the gain ``r = (σ² + |G|²) / (σ²/S + |G|²)``, between 1 (no noise: a larger batch
buys nothing) and ``S`` (pure noise: the linear scaling rule), and advances the
schedule by ``r`` instead of 1, so one schedule tuned at the reference batch serves
every batch. The two terms come from the squared norms that ``ow.accumulate`` (or
``ow.value_and_grad_by_group``, or per-device gradients) provides, estimated and
averaged as the authors' implementation, ``fairscale.optim.AdaScale``, does.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_warmup._tree_paths import flatten, unwrap
from optax_warmup._validation import check_int, check_real, concrete

_NEEDED = ("small_sq_norm", "big_sq_norm", "b_small", "b_big")
# fairscale's floor for the variance estimate (its grad_var clamp).
_MIN_VARIANCE = 1e-6


class AdaScaleState(NamedTuple):
    """State of ``adascale``."""

    count: jax.Array  # type: ignore[assignment]  # int32 scalar: updates so far.
    progress_steps: jax.Array  # int32 scalar: the whole part of τ.
    progress_fraction: jax.Array  # float scalar in [0, 1): the rest of τ.
    gain: jax.Array  # float scalar: r of the most recent update (1 before any).
    learning_rate: jax.Array  # float scalar: r·η(τ) of the most recent update.
    variance_sum: jax.Array  # float scalar: the moving sum of the σ² estimates.
    sq_norm_sum: jax.Array  # float scalar: the moving sum of the |G|² estimates.
    weight_sum: jax.Array  # float scalar: the moving sum of the weights (debias).
    inner_state: optax.OptState


def _estimates(
    small: jax.Array, big: jax.Array, groups: jax.Array, scale: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """fairscale's σ² (at the reference batch) and |G|² of one update, clamped."""
    variance = scale * (small - big) / (groups - 1)
    sq_norm = big - variance / scale
    return jnp.maximum(variance, _MIN_VARIANCE), jnp.maximum(sq_norm, 0.0)


def adascale(
    optimizer: Callable[..., optax.GradientTransformation],
    *,
    reference_batch_size: int,
    smoothing: float | None = None,
) -> Callable[..., optax.GradientTransformationExtraArgs]:
    r"""AdaScale around an optimizer factory, called as ``optax.inject_hyperparams``.

    ``ow.adascale(ow.sgd, reference_batch_size=32)(learning_rate=schedule,
    momentum=0.9)`` is ``ow.sgd(rate, momentum=0.9)`` with, at update ``t``,

    .. math::

      S = b_{big} / b_{ref}, \qquad
      r_t = \frac{\hat\sigma^2 + \widehat{|G|^2}}{\hat\sigma^2 / S + \widehat{|G|^2}},
      \qquad \text{rate}_t = r_t \, \eta(\tau_t), \qquad \tau_{t+1} = \tau_t + r_t,

    where ``η`` is the schedule tuned at the reference batch, counted in
    scale-invariant iterations ``τ`` (``τ_0 = 0``). ``update`` takes the batch's
    mean gradient and, as keyword arguments, the squared norms and sizes that
    ``ow.accumulate`` hands on (or ``ow.value_and_grad_by_group`` and
    ``ow.average_group_grads`` return): ``small_sq_norm`` (the mean of ``G =
    b_big / b_small`` group gradients' squared norms), ``big_sq_norm`` (their
    mean's), ``b_small`` and ``b_big``. Each update estimates, as
    ``fairscale.optim.AdaScale`` does,

    .. math::

      \sigma^2_t = \max\Big(\frac{S\,(|g_{small}|^2 - |g_{big}|^2)}{G - 1},
      10^{-6}\Big), \qquad
      |G|^2_t = \max(|g_{big}|^2 - \sigma^2_t / S,\ 0),

    (the variance of a gradient over ``reference_batch_size`` examples, and the
    squared norm of the true gradient), and averages each with the debiased moving
    average ``m ← f·m + (1 − f)·x``, ``w ← f·w + (1 − f)``, estimate ``m / w``, with
    smoothing ``f = max(1 − G/1000, 0)`` unless given. A training loop stops when
    ``ow.adascale_progress(state)`` reaches the reference schedule's length (in
    reference iterations); at a batch ``S`` times larger it takes between ``T/S``
    and ``T`` updates.

    ``ow.current_gain(state)`` reads ``r`` and ``ow.current_lr(state)`` the rate
    ``r·η(τ)`` of the most recent update. The inner optimizer is rebuilt at every
    update with ``learning_rate`` a function returning that rate, so any factory
    that takes a schedule works (every optax optimizer, and this library's
    recipes); the other keyword arguments are passed through unchanged, and the
    extra arguments of ``update`` too.

    Edge cases: before the first update the gain is 1 and the rate ``η(0)``. An
    update of one group (``b_big == b_small``) has no spread to measure: the
    averages are kept, and the gain comes from them (1 if there are none yet, as
    fairscale's initial state gives). At ``S = 1`` the gain is 1. Under
    ``jit`` sizes are not checked; a NaN norm makes the gain and the update NaN.
    One gain for all parameters (fairscale computes one per parameter group and, by
    default, one group holds them all). The estimates and τ are kept in float32, or
    float64 with float64 parameters (x64); τ is split into an int32 whole part and
    a fraction, so adding gains does not lose precision as τ grows.

    Args:
      optimizer: a factory of an optimizer with a ``learning_rate`` argument
        (``ow.sgd``, ``optax.sgd``, ...).
      reference_batch_size: the batch the schedule was tuned for (an integer >= 1).
      smoothing: ``f``, a constant in [0, 1), or None for ``max(1 − G/1000, 0)``.

    Returns:
      A function of ``learning_rate`` (a number >= 0 or a schedule of τ) and the
      factory's other keyword arguments, returning an
      ``optax.GradientTransformationExtraArgs`` with state ``AdaScaleState``.

    Raises:
      ValueError: ``reference_batch_size`` or ``smoothing`` out of range; at
        ``update``, concrete sizes where ``b_small`` does not divide ``b_big``.
      TypeError: at ``update``, a missing norm or size (a gain of nothing would be
        a silent 1).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optax_warmup as ow
      >>> tx = ow.adascale(optax.sgd, reference_batch_size=8)(learning_rate=0.1)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> # 4 groups of 8 whose gradients cancel: pure noise, so r = S = 4.
      >>> _, state = tx.update({"w": jnp.zeros(2)}, state, small_sq_norm=1.0,
      ...                      big_sq_norm=0.0, b_small=8, b_big=32)
      >>> float(ow.current_gain(state)), float(ow.adascale_progress(state))
      (4.0, 4.0)
      >>> round(float(ow.current_lr(state)), 6)
      0.4

    References:
      Johnson, Agrawal, Gu, Guestrin 2020, AdaScale SGD: A User-Friendly Algorithm
      for Distributed Training, arXiv:2007.05105; its implementation
      ``fairscale.optim.AdaScale``.
    """
    check_int("reference_batch_size", reference_batch_size, low=1)
    if smoothing is not None:
        check_real("smoothing", smoothing, low=0.0, high=1.0, high_open=True)

    def build(
        learning_rate: optax.ScalarOrSchedule, **kwargs: Any
    ) -> optax.GradientTransformationExtraArgs:
        if not callable(learning_rate):
            check_real("learning_rate", learning_rate, low=0.0)
        schedule = (
            learning_rate if callable(learning_rate) else (lambda _: learning_rate)
        )

        def inner(rate: jax.Array) -> optax.GradientTransformationExtraArgs:
            tx = optimizer(learning_rate=lambda _: rate, **kwargs)
            return optax.with_extra_args_support(tx)

        def init_fn(params: optax.Params) -> AdaScaleState:
            dtype = jnp.promote_types(optax.tree.dtype(params, "highest"), jnp.float32)
            zero = jnp.zeros([], dtype)
            rate = jnp.asarray(schedule(zero), dtype)
            return AdaScaleState(
                count=jnp.zeros([], jnp.int32),
                progress_steps=jnp.zeros([], jnp.int32),
                progress_fraction=zero,
                gain=jnp.ones([], dtype),
                learning_rate=rate,
                variance_sum=zero,
                sq_norm_sum=zero,
                weight_sum=zero,
                inner_state=inner(rate).init(params),
            )

        def update_fn(updates, state, params=None, **extra_args):
            missing = [name for name in _NEEDED if extra_args.get(name) is None]
            if missing:
                raise TypeError(
                    "adascale's update needs small_sq_norm=, big_sq_norm=, b_small= "
                    "and b_big= (wrap it in ow.accumulate, or pass those of "
                    f"ow.value_and_grad_by_group), missing {', '.join(missing)}"
                )
            b_small, b_big = extra_args["b_small"], extra_args["b_big"]
            check_int("b_small", b_small, low=1)
            check_int("b_big", b_big, low=1)
            small_n, big_n = concrete(b_small), concrete(b_big)
            if small_n is not None and big_n is not None and big_n % small_n:
                raise ValueError(
                    f"b_small must divide b_big (G = b_big / b_small groups), got "
                    f"b_small={b_small}, b_big={b_big}"
                )
            dtype = state.gain.dtype
            small = jnp.asarray(extra_args["small_sq_norm"], dtype)
            big = jnp.asarray(extra_args["big_sq_norm"], dtype)
            groups = jnp.asarray(b_big, dtype) / jnp.asarray(b_small, dtype)
            scale = jnp.asarray(b_big, dtype) / reference_batch_size

            # 1) this update's estimates, into the debiased moving averages.
            measured = groups > 1
            variance, sq_norm = _estimates(
                small, big, jnp.where(measured, groups, 2), scale
            )
            f = (
                jnp.asarray(smoothing, dtype)
                if smoothing is not None
                else jnp.maximum(1 - groups / 1000, 0)
            )

            def moved(total: jax.Array, x: jax.Array) -> jax.Array:
                return jnp.where(measured, f * total + (1 - f) * x, total)

            variance_sum = moved(state.variance_sum, variance)
            sq_norm_sum = moved(state.sq_norm_sum, sq_norm)
            weight_sum = moved(state.weight_sum, jnp.ones([], dtype))
            # 2) the gain; fairscale's initial averages (σ² = 0, |G|² = 1) give 1.
            seen = weight_sum > 0
            safe_weight = jnp.where(seen, weight_sum, 1)
            var_avg = jnp.where(seen, variance_sum / safe_weight, 0)
            sq_avg = jnp.where(seen, sq_norm_sum / safe_weight, 1)
            gain = (var_avg + sq_avg) / (var_avg / scale + sq_avg)
            # 3) the rate at τ, the inner update, and the clock.
            tau = state.progress_steps.astype(dtype) + state.progress_fraction
            rate = (gain * jnp.asarray(schedule(tau), dtype)).astype(dtype)
            new_updates, inner_state = inner(rate).update(
                updates, state.inner_state, params, **extra_args
            )
            fraction = state.progress_fraction + gain
            whole = jnp.floor(fraction)
            new_state = AdaScaleState(
                count=optax.safe_increment(state.count),
                progress_steps=state.progress_steps + whole.astype(jnp.int32),
                progress_fraction=fraction - whole,
                gain=gain,
                learning_rate=rate,
                variance_sum=variance_sum,
                sq_norm_sum=sq_norm_sum,
                weight_sum=weight_sum,
                inner_state=inner_state,
            )
            return new_updates, new_state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

    # The factory's own arguments, so that optax.inject_hyperparams can wrap it.
    try:
        build.__signature__ = inspect.signature(optimizer)  # type: ignore[attr-defined]
    except (TypeError, ValueError):  # a builtin or a callable without a signature
        pass
    return build


def _find(opt_state: Any, reader: str) -> AdaScaleState:
    if not isinstance(opt_state, tuple) and hasattr(opt_state, "opt_state"):
        opt_state = opt_state.opt_state
    leaves, _ = flatten(opt_state, is_leaf=lambda x: isinstance(x, AdaScaleState))
    found = [(p, s) for p, s in leaves if isinstance(s, AdaScaleState)]
    if not found:
        raise ValueError(
            f"{reader} found no AdaScaleState in opt_state: build the optimizer "
            "with ow.adascale(factory, reference_batch_size=...)(learning_rate=...)"
        )
    if len(found) > 1:
        where = ", ".join(path or "<root>" for path, _ in found)
        raise ValueError(
            f"{reader} found {len(found)} AdaScaleStates in opt_state, at {where}; "
            "pass the sub-state of the one you mean"
        )
    return found[0][1]


def current_gain(opt_state: Any) -> jax.Array:
    """AdaScale's gain ``r`` of the most recent update (1 before the first).

    Looks through any nesting of optax states (``ow.accumulate``, ``optax.chain``,
    ``nnx.Optimizer``, a ``TrainState``) for the one ``AdaScaleState``.

    Args:
      opt_state: an optax state, or an object with an ``opt_state`` attribute.

    Returns:
      The gain, a float scalar between 1 and ``S`` (for ``S >= 1``).

    Raises:
      ValueError: no ``AdaScaleState``, or more than one (the message lists where).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optax_warmup as ow
      >>> tx = ow.adascale(optax.sgd, reference_batch_size=8)(learning_rate=0.1)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> float(ow.current_gain(state))
      1.0
    """
    return unwrap(_find(opt_state, "current_gain").gain)


def adascale_progress(opt_state: Any) -> jax.Array:
    """AdaScale's scale-invariant iterations ``τ``: the sum of the gains so far.

    A run at a larger batch has done the work of ``τ`` reference iterations; stop
    when ``τ`` reaches the reference schedule's length. Looks through any nesting
    of optax states for the one ``AdaScaleState``.

    Args:
      opt_state: an optax state, or an object with an ``opt_state`` attribute.

    Returns:
      ``τ``, a float scalar (float32, or float64 with float64 parameters).

    Raises:
      ValueError: no ``AdaScaleState``, or more than one (the message lists where).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optax_warmup as ow
      >>> tx = ow.adascale(optax.sgd, reference_batch_size=8)(learning_rate=0.1)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> for _ in range(3):  # identical groups: no noise, a gain of 1 (up to
      ...     # fairscale's floor of 1e-6 on σ²)
      ...     _, state = tx.update({"w": jnp.ones(2)}, state, small_sq_norm=2.0,
      ...                          big_sq_norm=2.0, b_small=8, b_big=64)
      >>> round(float(ow.adascale_progress(state)), 4)
      3.0
    """
    state = _find(opt_state, "adascale_progress")
    fraction = unwrap(state.progress_fraction)
    return unwrap(state.progress_steps).astype(fraction.dtype) + fraction
