"""Layers stacked on leading axes: which axes of a leaf count layers, not features.

A transformer built with ``nnx.vmap`` + ``nnx.scan`` (or linen's ``nn.scan``) keeps
its L blocks as one leaf per parameter with a leading axis of length L: a bias of
``(L, C)``, a kernel of ``(L, C_in, C_out)``. Nothing in the arrays says so (flax
records the stacking axis only where the model declares sharding names), so the user
names the stacked subtrees once, ``stacked={"blocks": 1}``: a regular expression
searched in each leaf's '/'-joined path, and the number of leading axes that count
layers. ``decay_mask`` applies its rank rule to one layer's shape and the trust
ratios of ``lars`` and ``lamb`` take one norm per layer, from the same mapping, so
the two never disagree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Stacked = Mapping[str, int]


def leaf_shape(leaf: Any) -> tuple[int, ...]:
    """The shape of an array, a ``jax.ShapeDtypeStruct`` or a Python number."""
    shape = getattr(leaf, "shape", None)
    return tuple(shape) if shape is not None else np.shape(leaf)


def check_stacked(stacked: Any) -> list[tuple[re.Pattern[str], int]]:
    """The compiled (pattern, count) rules of ``stacked``, or a clear error."""
    if not isinstance(stacked, Mapping):
        raise TypeError(
            "stacked must map path patterns to numbers of stacked axes, e.g. "
            f"{{'blocks': 1}}, got {stacked!r}"
        )
    rules = []
    for pattern, axes in stacked.items():
        if not isinstance(pattern, str):
            raise TypeError(f"stacked patterns must be strings, got {pattern!r}")
        if isinstance(axes, bool) or not isinstance(axes, int) or axes < 1:
            raise ValueError(
                f"stacked[{pattern!r}] must be an integer >= 1 (the number of leading "
                f"axes that count layers), got {axes!r}"
            )
        try:
            rules.append((re.compile(pattern), axes))
        except re.error as error:
            raise ValueError(
                f"stacked pattern {pattern!r} is not a valid regular expression: "
                f"{error}"
            ) from error
    return rules


def layer_axes(
    leaves: Sequence[tuple[str, Any]],
    stacked: Stacked | None,
    paths: Sequence[str] | None = None,
) -> list[int]:
    """For each (path, leaf), the number of its leading axes that count layers.

    A pattern must match one of ``paths`` (default: the leaves' own paths; the whole
    tree's, ``whole_tree_paths``, inside a branch of ``optax.multi_transform``).

    Raises:
      TypeError: ``stacked`` is not a mapping of strings to integers.
      ValueError: a pattern is not a valid regular expression or matches no leaf, a
        count is not an integer >= 1, two patterns give one leaf different counts,
        or a count exceeds the leaf's rank; the message names the pattern or path.
    """
    if not stacked:
        return [0] * len(leaves)
    rules = check_stacked(stacked)
    counts = []
    used: set[str] = set()
    for path, leaf in leaves:
        matched = {(r.pattern, n) for r, n in rules if r.search(path)}
        used.update(pattern for pattern, _ in matched)
        numbers = {n for _, n in matched}
        if len(numbers) > 1:
            raise ValueError(
                f"stacked patterns {sorted(p for p, _ in matched)} give {path!r} "
                f"different numbers of stacked axes {sorted(numbers)}"
            )
        n = numbers.pop() if numbers else 0
        if n > len(leaf_shape(leaf)):
            raise ValueError(
                f"stacked gives {path!r} {n} stacked axes, but its shape is "
                f"{leaf_shape(leaf)}"
            )
        counts.append(n)
    if paths is None:
        paths = [path for path, _ in leaves]
    for regex, _ in rules:
        if regex.pattern not in used and not any(regex.search(p) for p in paths):
            raise ValueError(
                f"stacked pattern {regex.pattern!r} matches no parameter path "
                f"(paths look like {paths[:3]!r})"
            )
    return counts


def describe_shape(shape: tuple[int, ...], layers: int) -> str:
    """``(4, 16)`` as ``"4 × (16,)"`` when its first axis stacks 4 layers."""
    if not layers:
        return str(shape)
    stack = " × ".join(str(n) for n in shape[:layers])
    return f"{stack} × {shape[layers:]}"
