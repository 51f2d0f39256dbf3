"""Warmup as an optax transformation, and reading the learning rate back out of a state.

``scale_by_warmup`` multiplies the updates by a warmup factor of the step, so any
optimizer gets warmup by chaining it after; ``current_lr`` finds the learning rate
that the most recent update used anywhere in a nested optax state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.contrib
from jax.typing import ArrayLike

from optax_warmup._adascale import AdaScaleState
from optax_warmup._plateau import PlateauAfterWarmupState
from optax_warmup._schedule_parts import WarmupShape
from optax_warmup._schedules import warmup_schedule
from optax_warmup._tree_paths import flatten, unwrap
from optax_warmup._validation import check_real


class ScaleByWarmupState(NamedTuple):
    """State of ``scale_by_warmup``."""

    count: jax.Array  # type: ignore[assignment]  # int32 scalar: updates so far.
    factor: jax.Array  # float32 scalar: the factor of the most recent update.


def _cast_like(new: Any, old: Any) -> Any:
    dtype = getattr(old, "dtype", None)
    if dtype is None or getattr(new, "dtype", dtype) == dtype:
        return new
    return new.astype(dtype)


def keep_update_dtype(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that each update leaves with the dtype it came in with.

    A float32 learning rate or weight decay from a schedule promotes bf16 updates to
    float32 (``optax.inject_hyperparams`` does); this casts them back after the
    float32 arithmetic. The state is ``inner``'s, unchanged, and a float32 update is
    returned as it is.
    """
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        new_updates, new_state = inner.update(updates, state, params, **extra_args)
        return jax.tree.map(_cast_like, new_updates, updates), new_state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


class RateTraceState(NamedTuple):
    """State of ``scale_and_trace``."""

    trace: optax.Updates  # u: the velocity, learning rate included (None: m = 0).
    learning_rate: jax.Array  # float32 scalar: the rate of the most recent update.


def at_least_float32(value: ArrayLike) -> jax.Array:
    """``value`` as an array of a float dtype of at least 32 bits (an int 1 is 1.0)."""
    value = jnp.asarray(value)
    return value.astype(jnp.promote_types(value.dtype, jnp.float32))


def scale_and_trace(
    learning_rate: ArrayLike,
    momentum: ArrayLike,
    nesterov: bool = False,
    momentum_correction: bool = False,
) -> optax.GradientTransformation:
    """Momentum with the rate inside the velocity: ``u ← m·c·u − η·g``, update ``u``.

    This is ``optax.chain(optax.scale_by_learning_rate(η), optax.trace(m, nesterov))``
    (the form of ``optax.lars``) when ``momentum_correction`` is False (``c = 1``).
    With it, ``c = η_t / η_{t-1}``, Goyal et al.'s momentum correction (their §3,
    remark 2): when the rate changes, the velocity is rescaled with it, so a ×0.1
    milestone shrinks the very next update tenfold. ``c = 1`` at the first update
    and wherever the previous rate was 0. Nesterov's update is ``m·c·u_new − η·g``.
    The rate is taken in at least float32 (an integer rate 1 is 1.0). A momentum of
    0 given as a number keeps no velocity (``trace`` is None): the update is
    ``−η·g``.
    """
    no_trace = isinstance(momentum, int | float) and momentum == 0

    def init_fn(params: optax.Params) -> RateTraceState:
        trace = None if no_trace else jax.tree.map(jnp.zeros_like, params)
        return RateTraceState(trace, jnp.zeros([], jnp.float32))

    def update_fn(updates, state, params=None):
        del params
        lr = at_least_float32(learning_rate)
        if no_trace:
            scaled = jax.tree.map(lambda g: g * -lr, updates)
            return scaled, RateTraceState(None, lr.astype(jnp.float32))
        decay = momentum
        if momentum_correction:
            previous = state.learning_rate
            ratio = jnp.where(
                previous > 0, lr / jnp.where(previous > 0, previous, 1), 1
            )
            decay = momentum * ratio
        scaled = jax.tree.map(lambda g: g * -lr, updates)
        trace = jax.tree.map(lambda g, t: g + decay * t, scaled, state.trace)
        if nesterov:
            out = jax.tree.map(lambda g, t: g + decay * t, scaled, trace)
        else:
            out = trace
        trace = jax.tree.map(lambda t, old: t.astype(old.dtype), trace, state.trace)
        return out, RateTraceState(trace, lr.astype(jnp.float32))

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_warmup(
    warmup_steps: int | optax.Schedule,
    *,
    shape: WarmupShape = "linear",
    init_value: float = 0.0,
) -> optax.GradientTransformation:
    """Multiplies the updates by a warmup factor that rises from ``init_value`` to 1.

    With ``t`` the number of updates so far and ``W = warmup_steps``, the update
    ``u`` becomes ``f(t) · u`` where, for the linear shape,

    ``f(t) = init_value + (1 - init_value) · t / W`` for ``t < W``, ``f(t) = 1``
    after,

    that is ``warmup_schedule(1.0, W, shape=shape, init_value=init_value)`` (also
    ``"constant"``, ``"exponential"`` and ``"cosine"``). Chained after any
    optimizer it gives that optimizer a warmup::

      optax.chain(optax.adam(1e-3), ow.scale_by_warmup(1000))

    ``warmup_steps`` may instead be a factor schedule ``step -> f``, such as Ma &
    Yarats' ``ow.untuned_warmup_schedule(b2)``. Updates keep their dtype (bf16 in,
    bf16 out; the product is taken in float32 and cast back). The state holds an
    int32 count advanced with ``optax.safe_increment`` (it saturates rather than
    wraps) and the factor the most recent update used, which ``current_lr``
    multiplies in.

    Edge cases: the first update uses ``f(0) = init_value`` (0 by default: the first
    update is zero, as in He et al. 2019's warmup from 0); the update of count ``W``
    is the first at factor 1; ``warmup_steps=0`` gives factor 1 from the start.
    Under ``optax.MultiSteps`` the count is of optimizer updates, not micro-batches.

    Args:
      warmup_steps: W, an integer >= 0, or a schedule ``step -> factor``.
      shape: ``"linear"``, ``"constant"``, ``"exponential"`` or ``"cosine"``.
      init_value: the factor at step 0, in [0, 1] (> 0 for ``"exponential"``).

    Returns:
      An ``optax.GradientTransformation`` with state ``ScaleByWarmupState``.

    Raises:
      ValueError: ``warmup_steps`` is negative or not an integer, ``shape`` is not
        one of the four, ``init_value`` is outside [0, 1], or ``shape`` or
        ``init_value`` is given together with a schedule.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optax_warmup as ow
      >>> tx = optax.chain(optax.sgd(1.0), ow.scale_by_warmup(4))
      >>> params = {"w": jnp.zeros(())}
      >>> state = tx.init(params)
      >>> steps = []
      >>> for _ in range(6):
      ...     updates, state = tx.update({"w": jnp.ones(())}, state)
      ...     steps.append(float(updates["w"]))
      >>> steps
      [-0.0, -0.25, -0.5, -0.75, -1.0, -1.0]

    References:
      Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
      arXiv:1706.02677, section 2.2; Ma & Yarats 2019, On the Adequacy of Untuned
      Warmup for Adaptive Optimization, arXiv:1910.04209.
    """
    if callable(warmup_steps):
        if shape != "linear" or init_value != 0.0:
            raise ValueError(
                "shape and init_value describe a warmup of warmup_steps steps; with a "
                f"schedule as warmup_steps leave them out (got shape={shape!r}, "
                f"init_value={init_value!r})"
            )
        factor_fn = warmup_steps
    else:
        check_real("init_value", init_value, low=0.0, high=1.0)
        factor_fn = warmup_schedule(
            1.0, warmup_steps, init_value=init_value, shape=shape
        )

    def factor_of(count: jax.Array) -> jax.Array:
        return jnp.asarray(factor_fn(count), jnp.float32)

    def init_fn(params: optax.Params) -> ScaleByWarmupState:
        del params
        count = jnp.zeros([], jnp.int32)
        return ScaleByWarmupState(count=count, factor=factor_of(count))

    def update_fn(updates, state, params=None):
        del params
        factor = factor_of(state.count)
        updates = jax.tree.map(lambda u: _cast_like(u * factor, u), updates)
        count = optax.safe_increment(state.count)
        return updates, ScaleByWarmupState(count=count, factor=factor)

    return optax.GradientTransformation(init_fn, update_fn)


class RateReading(NamedTuple):
    """What one optimizer state says about the rate of the most recent update."""

    rate: Any = None  # the learning rate itself; a state holds at most one
    factor: Any = None  # a factor that the rate was multiplied by
    inner: str | None = None  # the field that holds the states below it to read
    unreadable: str | None = None  # why it scales the rate by a factor not kept
    # Its rate is the one the states below it were given: their rates (and the
    # schedule states that carry it, which cannot be read) are not counted; the
    # factors below it still are.
    shadows: bool = False


def _injected(state: Any) -> RateReading:
    return RateReading(rate=state.hyperparams.get("learning_rate"), inner="inner_state")


_SCHEDULE_NOT_KEPT = (
    "its state keeps only a count, not the schedule, so the factor of the most "
    "recent update cannot be read back. Use ow.scale_by_warmup(schedule), which "
    "keeps the factor it used, or optax.inject_hyperparams to keep the rate in the "
    "state; or pass current_lr the sub-state without it"
)

# How current_lr reads each state type it knows: one entry per type, found by
# isinstance anywhere in the state. A state with a ``rate`` holds the rate that
# everything below it uses (the fields it names in ``inner`` are still searched,
# for factors); one with a ``factor`` multiplies the rate; an ``unreadable`` one
# scales the rate by a factor that the state does not keep, and is refused. Every
# other node is looked through (chain, MultiSteps, masked, nnx's wrappers).
RATE_READERS: dict[type, Callable[[Any], RateReading]] = {
    optax.InjectStatefulHyperparamsState: _injected,
    optax.InjectHyperparamsState: _injected,
    ScaleByWarmupState: lambda s: RateReading(factor=s.factor),
    PlateauAfterWarmupState: lambda s: RateReading(factor=s.scale),
    optax.contrib.ReduceLROnPlateauState: lambda s: RateReading(factor=s.scale),
    optax.ScaleByBacktrackingLinesearchState: (
        lambda s: RateReading(factor=s.learning_rate)
    ),
    optax.ScaleByZoomLinesearchState: lambda s: RateReading(factor=s.learning_rate),
    optax.ScaleByScheduleState: (lambda s: RateReading(unreadable=_SCHEDULE_NOT_KEPT)),
    # AdaScale's rate r·η(τ) is the one its inner optimizer was given.
    AdaScaleState: lambda s: RateReading(
        rate=s.learning_rate, inner="inner_state", shadows=True
    ),
}


def _type_name(state: Any) -> str:
    """``optax.ScaleByScheduleState``: the package and the name users know it by."""
    return f"{type(state).__module__.split('.')[0]}.{type(state).__qualname__}"


def _read(opt_state: Any, prefix: str = "") -> list[tuple[str, Any, RateReading]]:
    """(path, state, reading) of every state of ``RATE_READERS`` in ``opt_state``."""
    known = tuple(RATE_READERS)
    found = []
    for path, node in flatten(opt_state, is_leaf=lambda x: isinstance(x, known))[0]:
        if not isinstance(node, known):
            continue
        path = f"{prefix}/{path}" if prefix and path else prefix or path
        reader = next(f for t, f in RATE_READERS.items() if isinstance(node, t))
        reading = reader(node)
        found.append((path, node, reading))
        if reading.inner is not None:
            inner_path = f"{path}/{reading.inner}" if path else reading.inner
            below = _read(getattr(node, reading.inner), inner_path)
            if reading.shadows:
                below = [
                    (p, n, r._replace(rate=None, unreadable=None)) for p, n, r in below
                ]
            found += below
    return found


def current_lr(opt_state: Any) -> jax.Array:
    """The learning rate that the most recent update used, read from the state.

    Looks through any nesting of optax states (``optax.chain``, ``optax.MultiSteps``,
    ``optax.masked``, the ``opt_state`` of ``nnx.Optimizer`` with its
    ``OptArray`` wrappers, a ``TrainState`` or an ``nnx.Optimizer`` itself) for the
    state in which ``optax.inject_hyperparams`` keeps its hyperparameters, where
    every recipe of this library writes its rate, and reads its
    ``learning_rate``; then multiplies in every factor it can read: that of each
    ``scale_by_warmup``, the scale of each ``reduce_on_plateau_after`` (or optax's
    ``contrib.reduce_on_plateau``) and the step size of optax's line searches.
    Inside ``ow.adascale`` it reads AdaScale's own rate ``r·η(τ)``, times the
    factors it can read in AdaScale's inner optimizer (a ``scale_by_schedule``
    there cannot be told from the rate AdaScale hands it, and is not read). The
    rate is returned in at least float32 (an integer rate 2 reads 2.0). States are
    found by their type, not by key: ``optax.tree.get(state, "learning_rate")``
    raises "Found multiple values" on such a state, since the schedule's own state
    is also keyed ``learning_rate``.

    A state that scales the rate by a factor it does not keep is refused rather
    than read as a plausible wrong rate: ``optax.scale_by_schedule`` (and
    ``optax.sgd(schedule)`` without ``inject_hyperparams``) keeps only a count.
    Chain ``ow.scale_by_warmup(schedule)`` instead, which keeps its factor.

    Chain order matters, and ``current_lr`` does not see it: it multiplies in every
    factor wherever it sits. A factor chained after the optimizer
    (``optax.chain(optax.adam(η), ow.scale_by_warmup(W))``) scales the step, and
    the product is the step's rate; one chained before Adam's normalisation
    (``optax.chain(ow.scale_by_warmup(W), optax.adam(η))``) scales the gradient,
    which Adam divides out again (up to ``eps``): it has no effect on the step,
    while ``current_lr`` still multiplies it in. Before plain SGD the two orders
    are the same.

    Edge cases: right after ``init`` it is the rate the first update will use, except
    where that depends on the first batch: ``ow.batch_scaled_rate`` reads ``η₀(0)``
    at the base batch and ``ow.adascale`` ``η(0)`` at a gain of 1 until their first
    update. Under ``optax.MultiSteps`` and ``ow.accumulate`` it changes only on the
    micro-batch that applies an update.
    It works under ``jit`` (it returns the traced value).

    Args:
      opt_state: an optax state, or an object with an ``opt_state`` attribute.

    Returns:
      The learning rate, a scalar array of a float dtype of at least 32 bits.

    Raises:
      ValueError: the state holds no injected learning rate (build the optimizer
        with ``optax.inject_hyperparams``, as ``goyal_sgd`` does), or more than one
        (the message lists where; pass the sub-state you mean), or a state that
        scales the rate by a factor it does not keep (the message names its type
        and where it is, and what to use instead).

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_warmup as ow
      >>> tx = ow.goyal_sgd(batch_size=1024, steps_per_epoch=10, warmup_epochs=1,
      ...                   milestones=(2,))
      >>> params = {"w": jnp.ones((2, 2))}
      >>> state = tx.init(params)
      >>> for _ in range(5):
      ...     _, state = tx.update({"w": jnp.zeros((2, 2))}, state, params)
      >>> round(float(ow.current_lr(state)), 4)  # 0.1 + (0.4 - 0.1) * 4 / 10
      0.22

    References:
      Goyal et al. 2017, arXiv:1706.02677, section 2.2.
    """
    if not isinstance(opt_state, tuple) and hasattr(opt_state, "opt_state"):
        opt_state = opt_state.opt_state
    readings = _read(opt_state)
    for path, state, reading in readings:
        if reading.unreadable is not None:
            raise ValueError(
                f"current_lr cannot read the factor of {_type_name(state)} at "
                f"{path or '<root>'!r}: {reading.unreadable}"
            )
    rates = [(path, r.rate) for path, _, r in readings if r.rate is not None]
    if not rates:
        raise ValueError(
            "current_lr found no learning rate in opt_state: build the optimizer "
            "with optax.inject_hyperparams(...)(learning_rate=...) (goyal_sgd "
            "does) so that the rate is kept in the state"
        )
    if len(rates) > 1:
        where = ", ".join(path or "<root>" for path, _ in rates)
        raise ValueError(
            f"current_lr found {len(rates)} learning rates in opt_state, at {where}; "
            "pass the sub-state of the one you mean"
        )
    lr = at_least_float32(unwrap(rates[0][1]))
    for _, _, reading in readings:
        if reading.factor is not None:
            lr = lr * jnp.asarray(unwrap(reading.factor), lr.dtype)
    return lr
