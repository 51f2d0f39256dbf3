"""Leaf paths of parameter and optimizer-state trees, with Flax's wrappers seen through.

``nnx.Optimizer`` hands optax ``nnx.Variable``-wrapped leaves at ``init`` and plain
arrays at ``update``; linen may box leaves in ``AxisMetadata``. Both name the same
parameter, so a path here is the '/'-joined keys without the wrapper's ``.value``,
and a leaf is the array inside the wrapper. Inside ``optax.masked`` (and so in each
branch of ``optax.multi_transform``) the leaves masked out are ``optax.MaskedNode``:
no leaves, but their paths are still the whole tree's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx
from flax.core import meta

# Attribute names through which a wrapper (nnx.Variable, linen's boxes) exposes its
# array: a path ending in one of them names the same leaf without it.
_WRAPPER_ATTRS = ("value", "raw_value")


def is_wrapped(x: Any) -> bool:
    """True for an ``nnx.Variable`` or a linen box: one leaf, not a subtree."""
    return isinstance(x, nnx.Variable | meta.AxisMetadata)


def unwrap(x: Any) -> Any:
    """The array inside a wrapper, or ``x`` itself."""
    if isinstance(x, nnx.Variable):
        return x.get_value()
    if isinstance(x, meta.AxisMetadata):
        return x.unbox()
    return x


def _key_str(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey | jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    return str(key)


def path_str(path: tuple[Any, ...]) -> str:
    """A key path as '/'-joined names, without a trailing wrapper attribute."""
    keys = list(path)
    while (
        keys
        and isinstance(keys[-1], jax.tree_util.GetAttrKey)
        and keys[-1].name in _WRAPPER_ATTRS
    ):
        keys.pop()
    return "/".join(_key_str(k) for k in keys)


def flatten(
    tree: Any, is_leaf: Callable[[Any], bool] | None = None
) -> tuple[list[tuple[str, Any]], Any]:
    """Leaves as ('/'-joined path, unwrapped value), and the tree definition.

    Wrappers are leaves; ``is_leaf`` may name more (a state to read whole).
    """

    def leaf(x: Any) -> bool:
        return is_wrapped(x) or (is_leaf is not None and is_leaf(x))

    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=leaf)
    return [(path_str(p), unwrap(x)) for p, x in leaves], treedef


def whole_tree_paths(tree: Any) -> list[str]:
    """The paths of every leaf, and of every ``optax.MaskedNode`` that stands for one.

    In a branch of ``optax.multi_transform`` these are the paths of the whole
    parameter tree (a label tree given as a prefix hides the paths below it), so a
    pattern can be checked against them rather than against the branch's leaves.
    """
    leaves, _ = flatten(tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    return [path for path, _ in leaves]
