"""Argument checks shared by the public constructors.

Each check runs where the value is concrete (a Python number, a NumPy or a committed
JAX array) and raises ``ValueError`` naming the argument and its value. A traced value
(inside ``jit``/``vmap``/``grad``) cannot be inspected and passes unchecked: the
public docstrings say what such a value does when it is wrong.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(value: Any) -> bool:
    """True when ``value`` is a JAX tracer (its number is unknown until run time)."""
    return isinstance(value, jax.core.Tracer)


def concrete(value: Any) -> float | None:
    """The number of a concrete scalar, or None for a traced one.

    Compare sizes through this, not with ``<`` on arrays: inside a trace (``jit``, a
    ``lax.cond`` branch) a comparison of two concrete arrays is itself traced.
    """
    if is_traced(value):
        return None
    return float(np.asarray(value))


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        array = np.asarray(value)
    except Exception as error:  # e.g. an object numpy cannot convert
        raise TypeError(f"{name} must be a number, got {value!r}") from error
    if array.ndim != 0 or not (  # jnp's view of dtypes includes bfloat16
        jnp.issubdtype(array.dtype, jnp.number) or array.dtype == np.bool_
    ):
        raise TypeError(f"{name} must be a scalar number, got {value!r}")
    return float(array)


def check_real(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Checks that a concrete scalar is finite and in [low, high] (or open ends)."""
    if is_traced(value):
        return
    number = _as_float(name, value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    below = number <= low if low_open else number < low
    above = number >= high if high_open else number > high
    if below or above:
        left, right = "(["[not low_open], ")]"[not high_open]
        if math.isinf(high):
            bound = f"> {low}" if low_open else f">= {low}"
        else:
            bound = f"in {left}{low}, {high}{right}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def check_int(name: str, value: Any, *, low: int = 0) -> None:
    """Checks that a concrete scalar is an integer (integral floats pass) >= low."""
    if is_traced(value):
        return
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        number = float(value)
    else:
        number = _as_float(name, value)
        if not math.isfinite(number) or number != math.floor(number):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if number < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Checks that ``value`` is one of the strings in ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
