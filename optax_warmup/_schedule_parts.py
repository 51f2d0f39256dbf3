"""The two parts every schedule is built from: a join of pieces, and ramp shapes.

``join`` puts schedules end to end at step boundaries; ``RAMPS`` is the one table of
curves from a start value to an end value that warmups and decays share. A warmup
rises along a shape; the decay of the same name is its mirror image in time, so a
``"cosine"`` or ``"1-sqrt"`` warmup and cooldown are the same curve run backwards
(as in Hägele et al. 2024 and HF transformers' ``get_wsd_schedule``).
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from optax_warmup._validation import check_real

WarmupShape = Literal["linear", "constant", "exponential", "cosine", "1-sqrt"]
DecayShape = Literal["linear", "cosine", "1-sqrt", "exponential"]
Time = Literal["relative", "absolute"]

WARMUP_SHAPES: tuple[str, ...] = typing.get_args(WarmupShape)
DECAY_SHAPES: tuple[str, ...] = typing.get_args(DecayShape)
TIMES: tuple[str, ...] = typing.get_args(Time)

# ramp(start, end, done, left) -> the value after a fraction ``done`` of the way from
# start to end; ``left = 1 - done`` is passed in, computed exactly by the caller, so
# that a mirrored ramp (a decay) evaluates sqrt(done), not sqrt(1 - (1 - done)).
Ramp = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def _cosine(a: jax.Array, b: jax.Array, done: jax.Array, left: jax.Array) -> jax.Array:
    return a + (b - a) * 0.5 * (1.0 - jnp.cos(jnp.pi * done))


RAMPS: dict[str, Ramp] = {
    "linear": lambda a, b, done, left: a + (b - a) * done,
    "cosine": _cosine,
    "exponential": lambda a, b, done, left: a * (b / a) ** done,
    "1-sqrt": lambda a, b, done, left: a + (b - a) * (1.0 - jnp.sqrt(left)),
    "constant": lambda a, b, done, left: a,
}


def f32(x: ArrayLike) -> jax.Array:
    """``x`` as a float32 array: every schedule computes in float32."""
    return jnp.asarray(x, jnp.float32)


def as_schedule(name: str, value: optax.ScalarOrSchedule) -> optax.Schedule:
    """A schedule as it is, or a constant (finite, >= 0) as a schedule."""
    if callable(value):
        return value
    check_real(name, value, low=0.0)
    constant = f32(value)
    return lambda step: constant


def fractions(t: jax.Array, length: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(done, left) of a phase of ``length`` steps at its step ``t``, in [0, 1].

    Both are exact at the ends (``left`` is 1 at ``t <= 0``, ``done`` is 1 at
    ``t >= length``): XLA may divide by a constant as a product with its rounded
    reciprocal, which would leave ``41 / 41`` one ulp short of 1.
    """
    span = jnp.maximum(length, 1.0)
    done = jnp.where(t >= length, 1.0, jnp.clip(t / span, 0.0, 1.0))
    left = jnp.where(t <= 0, 1.0, jnp.clip((length - t) / span, 0.0, 1.0))
    return done, left


def warmup_piece(
    shape: str, init: ArrayLike, peak: ArrayLike, length: ArrayLike
) -> optax.Schedule:
    """A rise from ``init`` at step 0 to ``peak`` at step ``length``."""

    def piece(t: jax.Array) -> jax.Array:
        done, left = fractions(t, f32(length))
        return RAMPS[shape](f32(init), f32(peak), done, left)

    return piece


def decay_piece(
    shape: str, peak: ArrayLike, end: ArrayLike, length: ArrayLike
) -> optax.Schedule:
    """A fall from ``peak`` at step 0 to ``end`` at step ``length``: the warmup of
    the same shape from ``end`` to ``peak``, run backwards."""

    def piece(t: jax.Array) -> jax.Array:
        done, left = fractions(t, f32(length))
        return RAMPS[shape](f32(end), f32(peak), left, done)

    return piece


def join(
    pieces: Sequence[optax.Schedule],
    boundaries: Sequence[ArrayLike],
    time: str = "relative",
) -> optax.Schedule:
    """Piece ``i`` for ``boundaries[i-1] <= step < boundaries[i]``, as one schedule.

    With ``time="relative"`` piece ``i`` sees ``step - boundaries[i-1]`` (optax's
    ``join_schedules``); with ``"absolute"`` it sees ``step`` itself. The step is cast
    to float32 first (uint32, int32, int64 and float steps agree) and negative steps
    count as 0, so no piece is ever evaluated at a negative step: an unselected
    piece cannot put NaN into the value or its gradient. Boundaries may be traced;
    a boundary that equals the previous one skips its piece. There is no Python
    ``if`` on array values, so everything may be traced.
    """
    if len(pieces) != len(boundaries) + 1:
        raise ValueError(
            f"join needs one piece more than boundaries, got {len(pieces)} pieces "
            f"and {len(boundaries)} boundaries"
        )

    def schedule(step: ArrayLike) -> jax.Array:
        t = jnp.maximum(f32(step), 0.0)
        value = f32(pieces[0](t))
        for piece, start in zip(pieces[1:], boundaries, strict=True):
            start = f32(start)
            local = jnp.maximum(t - start, 0.0) if time == "relative" else t
            value = jnp.where(t < start, value, f32(piece(local)))
        return value

    return schedule
