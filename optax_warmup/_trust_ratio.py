"""The layer-wise trust ratio of LARS and LAMB, masked and per stacked layer.

``optax.scale_by_trust_ratio`` scales every leaf and takes one norm over the whole
leaf. Here a mask (the weight-decay mask: BatchNorm parameters and biases keep the
global rate) picks the leaves, and a leaf of L stacked layers gets L ratios, one per
layer, from the same ``stacked`` mapping that ``decay_mask`` reads.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from optax_warmup._stacked_layers import Stacked, layer_axes
from optax_warmup._tree_paths import flatten, whole_tree_paths
from optax_warmup._weight_decay import MaskOrFn, resolve_mask, with_stacked


def _trust_ratio(
    update: jax.Array,
    param: jax.Array,
    layers: int,
    trust_coefficient: ArrayLike,
    eps: ArrayLike,
) -> jax.Array:
    """``update · c·‖w‖ / (‖u‖ + eps)``, norms per layer; ratio 1 where one is 0."""
    axes = tuple(range(layers, param.ndim))
    param_norm = jnp.sqrt(jnp.sum(jnp.square(param), axis=axes, keepdims=True))
    update_norm = jnp.sqrt(jnp.sum(jnp.square(update), axis=axes, keepdims=True))
    ratio = trust_coefficient * param_norm / (update_norm + eps)
    zero = (param_norm == 0.0) | (update_norm == 0.0)
    return update * jnp.where(zero, jnp.ones([], param.dtype), ratio)


def scale_by_trust_ratio(
    trust_coefficient: ArrayLike = 1.0,
    eps: ArrayLike = 0.0,
    *,
    mask: MaskOrFn | None = None,
    stacked: Stacked | None = None,
) -> optax.GradientTransformation:
    """Multiplies each masked leaf by ``c·‖w‖ / (‖u‖ + eps)``, one ratio per layer.

    The ratio is 1 where ``‖w‖`` or ``‖u‖`` is 0 (as in optax), and leaves outside
    ``mask`` are returned unchanged. The mask and ``stacked`` are resolved against
    the params at every update, so ``nnx.Optimizer``'s wrapped and plain trees agree.
    A mask function that takes a ``stacked`` keyword (``decay_mask`` or a
    ``functools.partial`` of it) is given ``stacked``, as ``decay_report`` does.
    """
    mask = with_stacked(mask, stacked)

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        if params is None:
            raise ValueError("the trust ratio needs params: call update(g, s, params)")
        leaves, treedef = flatten(params)
        # Trees in the structure of params, one entry per leaf (a wrapper counts as
        # one): whether it is scaled, and how many of its axes stack layers. They
        # are prefixes of updates and params, so nnx's wrappers pass through.
        flags = resolve_mask(mask, params)
        counts = layer_axes(leaves, stacked, whole_tree_paths(params))
        axes = jax.tree_util.tree_unflatten(treedef, counts)

        def scale(flag: bool, layers: int, update: Any, param: Any) -> Any:
            if not flag:
                return update
            return jax.tree.map(
                lambda u, p: _trust_ratio(u, p, layers, trust_coefficient, eps),
                update,
                param,
            )

        return jax.tree.map(scale, flags, axes, updates, params), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)
