"""Learning-rate schedules of the large-minibatch recipe: pure functions of the step.

Every schedule here is a closure ``schedule(step) -> float32 scalar`` like optax's. It
casts the step to float32 first, so the int32 count of optax, the uint32 step of
``nnx.Optimizer``, int64 steps (with x64) and float steps all give the same values, and
it uses no Python ``if`` on array values, so hyperparameters may be traced (``vmap``
over learning rates or warmup lengths). float32 counts exactly up to 2**24 steps;
beyond that a step may be rounded to its float32 neighbour (a hand-off or milestone
can move by a few steps out of millions).
"""

from __future__ import annotations

import itertools
import typing
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from optax_warmup._schedule_parts import (
    DECAY_SHAPES,
    TIMES,
    WARMUP_SHAPES,
    DecayShape,
    Time,
    WarmupShape,
    as_schedule,
    decay_piece,
    f32,
    join,
    warmup_piece,
)
from optax_warmup._validation import check_choice, check_int, check_real, is_traced

GoyalWarmup = Literal["gradual", "constant", "none"]
UntunedShape = Literal["linear", "exponential"]
_GOYAL_WARMUPS: tuple[str, ...] = typing.get_args(GoyalWarmup)
_UNTUNED_SHAPES: tuple[str, ...] = typing.get_args(UntunedShape)


def linear_scaling_rule(
    base_lr: ArrayLike, batch_size: ArrayLike, base_batch_size: ArrayLike = 256
) -> ArrayLike:
    """The linear scaling rule: multiply the batch size by k, multiply the rate by k.

    ``lr = base_lr * batch_size / base_batch_size``; Goyal et al. use
    ``η = 0.1 · kn / 256`` for ResNet-50 on ImageNet.

    Args:
      base_lr: the learning rate tuned for ``base_batch_size`` (finite, >= 0).
      batch_size: the total (global) minibatch size kn, over all workers (> 0).
      base_batch_size: the batch size ``base_lr`` was tuned for (> 0).

    Returns:
      The scaled learning rate: a Python float for Python numbers, else an array.

    Example:
      >>> import optax_warmup as ow
      >>> ow.linear_scaling_rule(0.1, 8192)
      3.2

    References:
      Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
      arXiv:1706.02677, section 2.1.
    """
    check_real("base_lr", base_lr, low=0.0)
    check_real("batch_size", batch_size, low=0.0, low_open=True)
    check_real("base_batch_size", base_batch_size, low=0.0, low_open=True)
    return base_lr * batch_size / base_batch_size


def warmup_schedule(
    after: optax.ScalarOrSchedule,
    warmup_steps: ArrayLike,
    *,
    init_value: ArrayLike = 0.0,
    shape: WarmupShape = "linear",
    time: Time = "relative",
) -> optax.Schedule:
    """Puts a warmup of ``warmup_steps`` steps in front of any schedule or constant.

    With ``W = warmup_steps``, ``f = t / W`` and ``peak`` the value of ``after`` at the
    hand-off (``after(0)`` for relative time, ``after(W)`` for absolute time), step
    ``t < W`` gives, by ``shape``:

    - ``"linear"`` (Goyal's gradual warmup): ``init + (peak - init) * f``;
    - ``"constant"`` (Goyal's constant warmup): ``init``, then a jump to ``after``;
    - ``"exponential"``: ``init * (peak / init) ** f``, a straight line in log scale
      (needs ``init_value > 0``; a peak <= 0 gives NaN);
    - ``"cosine"``: ``init + (peak - init) * (1 - cos(π f)) / 2``;
    - ``"1-sqrt"``: ``init + (peak - init) * (1 - sqrt(1 - f))``, the mirror image of
      the 1-sqrt cooldown of ``wsd_schedule``.

    Step ``t >= W`` gives ``after(t - W)`` with ``time="relative"`` (optax's
    ``join_schedules`` convention: ``after`` starts afresh at the hand-off) or
    ``after(t)`` with ``time="absolute"`` (Goyal's "we go back to the original learning
    rate schedule": decay milestones stay at absolute epochs). The hand-off is
    continuous for every shape but ``"constant"``, since the warmup ends at ``peak``.

    Edge cases: step 0 gives ``init_value`` (for ``W > 0``); ``warmup_steps=0`` gives
    exactly ``after`` at every step (optax's ``warmup_constant_schedule`` with 0 steps
    gives ``init_value`` forever); ``after`` is never evaluated at a negative step, so
    an unselected branch cannot make NaN values or NaN gradients; negative steps are
    treated as step 0.

    Hyperparameters may be traced (``jax.vmap`` over ``init_value``, a constant
    ``after`` or ``warmup_steps``); traced values are not checked, and a traced
    non-integer ``warmup_steps`` acts as the real number it is.

    Args:
      after: the schedule (``step -> value``) or constant that follows the warmup.
      warmup_steps: W, the number of warmup steps (an integer >= 0).
      init_value: the value at step 0 (finite, >= 0; > 0 for ``"exponential"``).
      shape: ``"linear"``, ``"constant"``, ``"exponential"``, ``"cosine"`` or
        ``"1-sqrt"``.
      time: ``"relative"`` or ``"absolute"``: the step that ``after`` sees.

    Returns:
      A schedule ``step -> float32 scalar``.

    Example:
      >>> import optax, optax_warmup as ow
      >>> decay = optax.cosine_decay_schedule(1.0, decay_steps=100)
      >>> schedule = ow.warmup_schedule(decay, warmup_steps=10)
      >>> [round(float(schedule(t)), 3) for t in (0, 5, 10, 60)]
      [0.0, 0.5, 1.0, 0.5]

    References:
      Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
      arXiv:1706.02677, section 2.2.
    """
    check_int("warmup_steps", warmup_steps)
    check_choice("shape", shape, WARMUP_SHAPES)
    check_choice("time", time, TIMES)
    if shape == "exponential":
        check_real("init_value", init_value, low=0.0, low_open=True)
    else:
        check_real("init_value", init_value, low=0.0)
    after_fn = as_schedule("after", after)
    peak = after_fn(0) if time == "relative" else after_fn(f32(warmup_steps))
    warm = warmup_piece(shape, init_value, peak, warmup_steps)
    return join([warm, after_fn], [warmup_steps], time)


def gradual_warmup_schedule(
    base_lr: ArrayLike,
    multiplier: ArrayLike,
    warmup_steps: ArrayLike,
    after: optax.Schedule | None = None,
) -> optax.Schedule:
    """The GradualWarmupScheduler of the seed (ildoonet's PyTorch scheduler), per step.

    For ``t < T = warmup_steps``::

      multiplier > 1:   base_lr * ((multiplier - 1) * t / T + 1)  (from base_lr up)
      multiplier == 1:  base_lr * t / T                           (from 0 up)

    and from step ``T`` on ``after(t - T)`` (relative steps; ``after`` should start at
    ``multiplier * base_lr``), or the constant ``multiplier * base_lr`` when ``after``
    is None. The reference warms up from 0 when multiplier is 1, a case that its
    formula alone would hold at base_lr forever; it is kept here.

    Unlike the stateful PyTorch scheduler, this is a pure function of the step: the
    first step after warmup is exactly ``after(0)`` (not the stale peak, not one step
    late), and a resumed run gets the same rate as an uninterrupted one.

    Args:
      base_lr: the learning rate at step 0 (finite, >= 0).
      multiplier: the peak is ``multiplier * base_lr`` (>= 1).
      warmup_steps: T (an integer >= 0); 0 gives ``after`` (or the peak) at once.
      after: the schedule after the warmup, or None for a constant peak.

    Returns:
      A schedule ``step -> float32 scalar``.

    Example:
      >>> import optax_warmup as ow
      >>> schedule = ow.gradual_warmup_schedule(0.1, multiplier=8, warmup_steps=4)
      >>> [round(float(schedule(t)), 3) for t in range(6)]
      [0.1, 0.275, 0.45, 0.625, 0.8, 0.8]

    References:
      Goyal et al. 2017, arXiv:1706.02677, section 2.2;
      github.com/ildoonet/pytorch-gradual-warmup-lr.
    """
    check_real("base_lr", base_lr, low=0.0)
    check_real("multiplier", multiplier, low=1.0)
    check_int("warmup_steps", warmup_steps)
    peak = f32(base_lr) * f32(multiplier)
    init = jnp.where(f32(multiplier) == 1.0, 0.0, f32(base_lr))
    after_fn = (lambda step: peak) if after is None else after
    warm = warmup_piece("linear", init, peak, warmup_steps)
    return join([warm, after_fn], [warmup_steps], "relative")


def step_decay_schedule(
    init_value: ArrayLike,
    boundaries: Sequence[ArrayLike],
    factor: ArrayLike | Sequence[ArrayLike] = 0.1,
) -> optax.Schedule:
    """A piecewise-constant decay: ``init_value``, times ``factor`` at each boundary.

    Step ``t`` gives ``init_value * Π_{i : t >= boundaries[i]} factor_i`` (one
    ``factor`` for every boundary, or one per boundary), so with the default
    ``init · 0.1^k`` after the k-th boundary: the step decay of Goyal et al. (×0.1 at
    epochs 30, 60 and 80) and of torch's ``MultiStepLR``.

    Unlike ``optax.piecewise_constant_schedule``, which compares the step with its
    boundaries in the step's own dtype, this casts the step to float32 first: the
    uint32 ``nnx.Optimizer.step`` gets the decayed value, not the undecayed one.

    Edge cases: no boundaries is the constant ``init_value``; a boundary at 0 decays
    from the first step; a non-integer boundary ``b`` takes effect at step
    ``ceil(b)``; negative steps count as step 0.

    Args:
      init_value: the value before the first boundary (finite, >= 0).
      boundaries: steps at which the value is multiplied, strictly increasing, >= 0.
      factor: the multiplier at every boundary, or a sequence with one multiplier
        per boundary; each finite and >= 0.

    Returns:
      A schedule ``step -> float32 scalar``.

    Raises:
      ValueError: ``boundaries`` not increasing or negative, a ``factor`` negative,
        NaN or infinite, or as many factors as boundaries not given.

    Example:
      >>> import optax_warmup as ow
      >>> schedule = ow.step_decay_schedule(1.0, boundaries=[30, 60, 80])
      >>> [round(float(schedule(t)), 4) for t in (0, 29, 30, 60, 80, 10**6)]
      [1.0, 1.0, 0.1, 0.01, 0.001, 0.001]

    References:
      Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
      arXiv:1706.02677, section 5.1.
    """
    check_real("init_value", init_value, low=0.0)
    for b in boundaries:
        check_real("boundaries", b, low=0.0)
    steps = tuple(float(np.asarray(b)) for b in boundaries)
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError(f"boundaries must be strictly increasing, got {steps}")
    if isinstance(factor, Sequence):
        factors = tuple(factor)
        if len(factors) != len(steps):
            raise ValueError(
                f"factor must be one number or one per boundary, got {len(factors)} "
                f"factors for {len(steps)} boundaries"
            )
    else:
        factors = (factor,) * len(steps)
    for f in factors:
        check_real("factor", f, low=0.0)
    # Each level rounded to float32 once, from a float64 product, when the values
    # are concrete; traced ones multiply in float32.
    values = [init_value, *factors]
    exact = not any(is_traced(v) for v in values)
    level: ArrayLike = np.asarray(init_value, np.float64) if exact else f32(init_value)
    levels = [f32(level)]
    for f in factors:
        level = level * (np.asarray(f, np.float64) if exact else f32(f))
        levels.append(f32(level))
    return join([lambda t, v=v: v for v in levels], steps, "absolute")


def goyal_schedule(
    batch_size: int,
    steps_per_epoch: int,
    *,
    base_lr: float = 0.1,
    base_batch_size: int = 256,
    warmup_epochs: float = 5,
    milestones: Sequence[float] = (30, 60, 80),
    decay_factor: float = 0.1,
    warmup: GoyalWarmup = "gradual",
) -> optax.Schedule:
    """Goyal et al.'s ImageNet schedule, per iteration.

    With ``peak = base_lr * batch_size / base_batch_size`` (the linear scaling rule),
    ``start = min(base_lr, peak)``, ``W = warmup_epochs * steps_per_epoch`` (rounded
    to a step) and ``M_i = milestones[i] * steps_per_epoch``, step ``t`` gives:

    1) warmup, ``t < W``: ``"gradual"``: ``start + (peak - start) * t / W``;
       ``"constant"``: ``start``; ``"none"``: no warmup (``W = 0``);
    2) after: ``peak * decay_factor ** #{i : t >= M_i}``, at absolute epochs
       (``step_decay_schedule(peak, M, decay_factor)``).

    Step 0 gives ``start`` (``base_lr`` for k >= 1; ``peak`` with ``"none"``), step
    ``W`` gives ``peak``, and
    the first step of epoch 30 gives ``peak * 0.1``. The count is the optimizer's:
    under ``optax.MultiSteps`` a step is one optimizer update, not one micro-batch.

    Goyal et al.'s warmup is for k = batch_size / base_batch_size >= 1, up from
    ``base_lr``. For a batch below ``base_batch_size`` (k < 1) there is nothing to
    warm up to: the warmup starts at ``min(base_lr, peak) = peak``, so every step
    before the first milestone runs at the linearly scaled rate (a warmup from
    ``base_lr`` down to it would run the first steps at 1/k times that rate).

    Args:
      batch_size: the global minibatch size kn (> 0).
      steps_per_epoch: optimizer steps per epoch (an integer > 0).
      base_lr: the rate for ``base_batch_size`` (0.1 for 256 in the paper).
      base_batch_size: the batch size ``base_lr`` belongs to.
      warmup_epochs: length of the warmup in epochs (>= 0; may be fractional).
      milestones: epochs at which the rate is multiplied by ``decay_factor``: strictly
        increasing and after the warmup.
      decay_factor: the factor at each milestone, in (0, 1].
      warmup: ``"gradual"``, ``"constant"`` or ``"none"``.

    Returns:
      A schedule ``step -> float32 scalar``.

    Example:
      >>> import optax_warmup as ow
      >>> schedule = ow.goyal_schedule(batch_size=8192, steps_per_epoch=156)
      >>> [round(float(schedule(e * 156)), 4) for e in (0, 5, 30, 60, 80)]
      [0.1, 3.2, 0.32, 0.032, 0.0032]

    References:
      Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
      arXiv:1706.02677, sections 2.1, 2.2 and 5.1.
    """
    check_int("steps_per_epoch", steps_per_epoch, low=1)
    check_real("warmup_epochs", warmup_epochs, low=0.0)
    check_real("decay_factor", decay_factor, low=0.0, high=1.0, low_open=True)
    check_choice("warmup", warmup, _GOYAL_WARMUPS)
    peak = linear_scaling_rule(base_lr, batch_size, base_batch_size)
    warmup_end = 0.0 if warmup == "none" else float(warmup_epochs)
    milestones = tuple(milestones)
    for m in milestones:
        check_real("milestones", m, low=0.0)
    if any(b <= a for a, b in itertools.pairwise(milestones)):
        raise ValueError(f"milestones must be strictly increasing, got {milestones}")
    if milestones and milestones[0] <= warmup_end:
        raise ValueError(
            f"milestones must come after the warmup ({warmup_end} epochs), "
            f"got {milestones}"
        )
    decayed = step_decay_schedule(
        peak, [m * steps_per_epoch for m in milestones], decay_factor
    )
    start = (
        jnp.minimum(base_lr, peak)
        if is_traced(base_lr) or is_traced(peak)
        else min(float(np.asarray(base_lr)), float(np.asarray(peak)))
    )
    return warmup_schedule(
        decayed,
        round(warmup_end * steps_per_epoch),
        init_value=start,
        shape="constant" if warmup == "constant" else "linear",
        time="absolute",
    )


def wsd_schedule(
    peak_value: ArrayLike,
    *,
    warmup_steps: ArrayLike,
    stable_steps: ArrayLike,
    decay_steps: ArrayLike,
    init_value: ArrayLike = 0.0,
    end_value: ArrayLike = 0.0,
    warmup_shape: WarmupShape = "linear",
    decay_shape: DecayShape = "1-sqrt",
) -> optax.Schedule:
    """Warmup–stable–decay: a warmup, a long constant phase, then a short cooldown.

    With ``W``, ``S``, ``D`` the three lengths and ``p = (t - W - S) / D`` the
    fraction of the cooldown done, step ``t`` gives:

    1) warmup, ``t < W``: ``warmup_schedule``'s ramp from ``init_value`` to
       ``peak_value`` along ``warmup_shape``;
    2) stable, ``W <= t < W + S``: ``peak_value``;
    3) decay, ``W + S <= t < W + S + D``: ``end + (peak - end) * d(p)`` with
       ``d(p) = 1 - sqrt(p)`` (``"1-sqrt"``, the best cooldown of Hägele et al.),
       ``1 - p`` (``"linear"``), ``(1 + cos(π p)) / 2`` (``"cosine"``), or
       ``end * (peak / end) ** (1 - p)`` (``"exponential"``, needs ``end_value > 0``);
    4) after, ``t >= W + S + D``: ``end_value``.

    With ``init_value = end_value`` (0 for both by default) it equals, step for step,
    HF transformers' ``get_wsd_schedule(num_warmup_steps=W, num_stable_steps=S,
    num_decay_steps=D, min_lr_ratio=end_value / peak_value, warmup_type=...,
    decay_type=...)`` times ``peak_value``: HF's warmup starts at
    ``min_lr_ratio · peak``. The stable phase keeps the run open-ended: a cooldown
    can start from any checkpoint of it.

    Edge cases: any of the three lengths may be 0 (its phase is skipped; ``D = 0``
    jumps from ``peak_value`` to ``end_value``); step 0 gives ``init_value`` when
    ``W > 0``; negative steps count as step 0. All values and lengths may be traced
    (``jax.vmap`` over peaks or lengths); traced values are not checked.

    Args:
      peak_value: the value of the stable phase (finite, >= 0).
      warmup_steps: W, an integer >= 0.
      stable_steps: S, an integer >= 0.
      decay_steps: D, an integer >= 0.
      init_value: the value at step 0 (>= 0; > 0 for an exponential warmup).
      end_value: the value at the end of the decay and after it, in
        ``[0, peak_value]`` (> 0 for an exponential decay).
      warmup_shape: a shape of ``warmup_schedule``: ``"linear"`` (default),
        ``"constant"``, ``"exponential"``, ``"cosine"`` or ``"1-sqrt"``.
      decay_shape: ``"1-sqrt"`` (default), ``"linear"``, ``"cosine"`` or
        ``"exponential"``.

    Returns:
      A schedule ``step -> float32 scalar``.

    Raises:
      ValueError: a negative or non-integer length, a negative or non-finite value,
        ``end_value > peak_value``, or an unknown shape; the message names it.

    Example:
      >>> import optax_warmup as ow
      >>> schedule = ow.wsd_schedule(1.0, warmup_steps=10, stable_steps=80,
      ...                            decay_steps=10)
      >>> [round(float(schedule(t)), 3) for t in (0, 5, 10, 89, 90, 95, 100)]
      [0.0, 0.5, 1.0, 1.0, 1.0, 0.293, 0.0]

    References:
      Hu et al. 2024, MiniCPM: Unveiling the Potential of Small Language Models with
      Scalable Training Strategies, arXiv:2404.06395; Hägele et al. 2024, Scaling
      Laws and Compute-Optimal Training Beyond Fixed Training Durations,
      arXiv:2405.18392.
    """
    check_real("peak_value", peak_value, low=0.0)
    for name, steps in (
        ("warmup_steps", warmup_steps),
        ("stable_steps", stable_steps),
        ("decay_steps", decay_steps),
    ):
        check_int(name, steps)
    check_choice("warmup_shape", warmup_shape, WARMUP_SHAPES)
    check_choice("decay_shape", decay_shape, DECAY_SHAPES)
    positive = warmup_shape == "exponential"
    check_real("init_value", init_value, low=0.0, low_open=positive)
    positive = decay_shape == "exponential"
    check_real("end_value", end_value, low=0.0, low_open=positive)
    concrete = not (is_traced(peak_value) or is_traced(end_value))
    if concrete and np.asarray(end_value, float) > np.asarray(peak_value, float):
        raise ValueError(
            f"end_value must be <= peak_value={peak_value!r}, got {end_value!r}"
        )
    w, s, d = f32(warmup_steps), f32(stable_steps), f32(decay_steps)
    pieces = [
        warmup_piece(warmup_shape, init_value, peak_value, w),
        lambda t: f32(peak_value),
        decay_piece(decay_shape, peak_value, end_value, d),
        lambda t: f32(end_value),
    ]
    return join(pieces, [w, w + s, w + s + d], "relative")


def untuned_warmup_schedule(
    b2: float = 0.999, shape: UntunedShape = "linear"
) -> optax.Schedule:
    """The untuned warmup factor for Adam of Ma & Yarats 2019, in (0, 1].

    With ``t`` the 0-based count (``t + 1`` is Adam's step index):

    - ``"linear"``: ``min(1, (t + 1) / τ)`` with ``τ = 2 / (1 - b2)``
      (2000 steps for ``b2 = 0.999``);
    - ``"exponential"``: ``1 - exp(-(t + 1) / τ)`` with ``τ = 1 / (1 - b2)``.

    Multiply an Adam learning rate by it, or give it to ``scale_by_warmup``.

    Args:
      b2: Adam's second-moment decay, in (0, 1).
      shape: ``"linear"`` or ``"exponential"``.

    Returns:
      A schedule ``step -> float32 scalar``.

    Example:
      >>> import optax_warmup as ow
      >>> factor = ow.untuned_warmup_schedule(b2=0.999)
      >>> [round(float(factor(t)), 4) for t in (0, 999, 1999, 5000)]
      [0.0005, 0.5, 1.0, 1.0]

    References:
      Ma & Yarats 2019, On the Adequacy of Untuned Warmup for Adaptive Optimization,
      arXiv:1910.04209.
    """
    check_real("b2", b2, low=0.0, high=1.0, low_open=True, high_open=True)
    check_choice("shape", shape, _UNTUNED_SHAPES)

    one_minus_b2 = f32(1.0 - b2)  # in float64 first when b2 is a Python float

    def schedule(step: ArrayLike) -> jax.Array:
        n = jnp.maximum(f32(step), 0.0) + 1.0
        if shape == "linear":
            return jnp.minimum(1.0, n * one_minus_b2 / 2.0)
        return -jnp.expm1(-n * one_minus_b2)

    return schedule
