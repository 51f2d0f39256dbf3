"""Weight decay that skips BatchNorm parameters and biases: the mask and the transform.

``decay_mask`` decides which leaves are decayed from their rank and their path;
``masked_weight_decay`` is ``optax.masked(optax.add_decayed_weights(...))`` with that
mask, made safe for ``flax.nnx``: the mask is rebuilt in the structure of whatever
tree optax hands it, so the ``Param``-wrapped tree that ``nnx.Optimizer`` gives to
``init`` and the plain arrays it gives to ``update`` get the same mask.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
import optax

from optax_warmup._transforms import keep_update_dtype
from optax_warmup._tree_paths import flatten
from optax_warmup._validation import check_real, is_traced

MaskOrFn = Any | Callable[[optax.Params], Any]


def _ndim(x: Any) -> int:
    shape = getattr(x, "shape", None)
    return len(shape) if shape is not None else np.ndim(x)


def _compile(name: str, patterns: str | Iterable[str]) -> list[re.Pattern[str]]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    compiled = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{name} patterns must be strings, got {pattern!r}")
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(
                f"{name} pattern {pattern!r} is not a valid regular expression: {error}"
            ) from error
    return compiled


def decay_mask(
    params: optax.Params,
    *,
    exclude: str | Iterable[str] = (),
    include: str | Iterable[str] = (),
) -> Any:
    """Which parameters get weight decay: kernels yes, norm parameters and biases no.

    Each leaf is decided in three rules, later rules winning:

    1) rank: ``True`` (decayed) when ``ndim >= 2`` (conv and dense kernels,
       embeddings), ``False`` when ``ndim <= 1`` (BatchNorm and LayerNorm scale and
       bias, all biases): Goyal et al.'s "no weight decay on BN γ and β" and He et
       al.'s "no bias decay";
    2) ``exclude``: ``False`` when the leaf's path matches one of these patterns;
    3) ``include``: ``True`` when the leaf's path matches one of these patterns.

    A path is the leaf's keys joined with ``'/'`` (``"params/Conv_0/kernel"`` in
    linen, ``"conv/kernel"`` in nnx), without the ``.value`` of an ``nnx.Variable``;
    patterns are Python regular expressions found anywhere in it (``re.search``), so
    anchor them (``r"(^|/)bias$"``) to match whole names.

    The mask has the structure of ``params`` with every leaf (an ``nnx.Variable`` or a
    linen box counts as one leaf) replaced by a Python bool. It is the same for a
    linen ``dict`` or ``FrozenDict``, for ``nnx.state(model, nnx.Param)`` and for
    the plain-array tree that ``nnx.Optimizer`` passes to ``update``, so it serves as
    the ``mask`` of ``optax.masked`` either as this function or as a tree computed
    once. Shapes are read, not values: abstract trees (``jax.eval_shape``) and
    tracers work.

    Edge cases: a scalar leaf (``ndim == 0``) is not decayed; an empty ``params``
    gives an empty mask; a ``(L, C)`` norm scale of a scanned layer is decayed by the
    rank rule, so exclude it by name.

    Args:
      params: a tree of arrays (or of shapes), possibly of ``nnx.Variable``.
      exclude: a regular expression or a sequence of them: matching leaves are not
        decayed.
      include: a regular expression or a sequence of them: matching leaves are
        decayed (even if excluded).

    Returns:
      A tree of Python bools, ``True`` where weight decay applies.

    Raises:
      ValueError: a pattern is not a valid regular expression, or matches no leaf
        (a typo must not silently decay everything); the message names it.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_warmup as ow
      >>> params = {"conv": {"kernel": jnp.ones((3, 3, 1, 8)), "bias": jnp.ones(8)},
      ...           "bn": {"scale": jnp.ones(8), "bias": jnp.ones(8)},
      ...           "embed": {"embedding": jnp.ones((10, 8))}}
      >>> ow.decay_mask(params)
      {'bn': {'bias': False, 'scale': False}, 'conv': {'bias': False, 'kernel': True}, 'embed': {'embedding': True}}
      >>> ow.decay_mask(params, exclude=r"^embed/")["embed"]
      {'embedding': False}

    References:
      Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
      arXiv:1706.02677, section 5.1; He et al. 2019, Bag of Tricks for Image
      Classification with Convolutional Neural Networks, arXiv:1812.01187,
      section 3.1.
    """  # noqa: E501
    exclude_res = _compile("exclude", exclude)
    include_res = _compile("include", include)
    leaves, treedef = flatten(params)
    paths = [path for path, _ in leaves]
    for name, regexes in (("exclude", exclude_res), ("include", include_res)):
        for regex in regexes:
            if not any(regex.search(path) for path in paths):
                raise ValueError(
                    f"{name} pattern {regex.pattern!r} matches no parameter path "
                    f"(paths look like {paths[:3]!r})"
                )
    mask = []
    for path, leaf in leaves:
        decayed = _ndim(leaf) >= 2  # 1) rank
        if any(regex.search(path) for regex in exclude_res):  # 2) exclude
            decayed = False
        if any(regex.search(path) for regex in include_res):  # 3) include
            decayed = True
        mask.append(decayed)
    return jax.tree_util.tree_unflatten(treedef, mask)


def _as_bool(path: str, value: Any) -> bool:
    if is_traced(value):
        raise ValueError(
            f"mask must hold Python bools, but the entry for {path!r} is traced: a "
            "mask must be static (with optax.inject_hyperparams, pass "
            "static_args=('mask',))"
        )
    if isinstance(value, bool | np.bool_):
        return bool(value)
    array = np.asarray(value)
    if array.ndim != 0 or array.dtype != np.bool_:
        raise ValueError(
            f"mask must hold bools, got {value!r} for {path!r} (with "
            "optax.inject_hyperparams, pass static_args=('mask',))"
        )
    return bool(array)


def _ancestors(path: str) -> list[str]:
    """``path`` and its parents, nearest first, ending with the root ``""``."""
    parts = path.split("/") if path else []
    return ["/".join(parts[:i]) for i in range(len(parts), -1, -1)]


def resolve_mask(mask: MaskOrFn | None, params: optax.Params) -> Any:
    """The mask for ``params`` as a tree of Python bools in the structure of ``params``.

    ``mask`` may be a function of the tree, a tree of bools with the structure of
    ``params`` or a prefix of it (``{"backbone": False, "head": True}``), with or
    without ``nnx.Variable`` wrappers, or None (decay everything).

    Raises:
      ValueError: the mask and ``params`` differ in structure (the message names the
        first path that differs), or a mask entry is not a static bool.
    """
    leaves, treedef = flatten(params)
    if mask is None:
        return jax.tree_util.tree_unflatten(treedef, [True] * len(leaves))
    tree = mask(params) if callable(mask) else mask
    entries = {path: _as_bool(path, value) for path, value in flatten(tree)[0]}
    # Each param takes the entry at its own path or its nearest parent: one dict
    # lookup per level, so a large model resolves in time linear in its leaves.
    values, used = [], set()
    for path, _ in leaves:
        entry = next((p for p in _ancestors(path) if p in entries), None)
        if entry is None:
            raise ValueError(
                "mask does not match the structure of params: the first path that "
                f"differs is {path!r} (in params, not in the mask)"
            )
        values.append(entries[entry])
        used.add(entry)
    for mask_path in entries:
        if mask_path not in used:
            raise ValueError(
                "mask does not match the structure of params: the first path that "
                f"differs is {mask_path!r} (in the mask, not in params)"
            )
    return jax.tree_util.tree_unflatten(treedef, values)


def decay_report(params: optax.Params, mask: MaskOrFn | None = None) -> str:
    """A table of which parameters are decayed, to read before training.

    One row per leaf (path, shape, dtype, decayed or not), then the totals of leaves
    and of parameters (elements), decayed and not.

    Args:
      params: a tree of arrays or of ``jax.ShapeDtypeStruct`` (from
        ``jax.eval_shape``), possibly of ``nnx.Variable``.
      mask: what ``masked_weight_decay`` would get: a function of ``params``, a tree
        of bools, or None for ``decay_mask``.

    Returns:
      The table as a string: ``print(ow.decay_report(params))``.

    Raises:
      ValueError: the mask does not match ``params`` (naming the first path that
        differs).

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_warmup as ow
      >>> params = {"conv": {"kernel": jnp.ones((3, 3, 1, 8)), "bias": jnp.ones(8)},
      ...           "bn": {"scale": jnp.ones(8), "bias": jnp.ones(8)}}
      >>> print(ow.decay_report(params))
      path         shape         dtype    decayed
      bn/bias      (8,)          float32  no
      bn/scale     (8,)          float32  no
      conv/bias    (8,)          float32  no
      conv/kernel  (3, 3, 1, 8)  float32  yes
      decayed:     1 leaves, 72 parameters
      not decayed: 3 leaves, 24 parameters
      total:       4 leaves, 96 parameters

    References:
      Goyal et al. 2017, arXiv:1706.02677, section 5.1; He et al. 2019,
      arXiv:1812.01187, section 3.1.
    """
    resolved = resolve_mask(decay_mask if mask is None else mask, params)
    leaves, _ = flatten(params)
    flags = [flag for _, flag in flatten(resolved)[0]]
    rows = [("path", "shape", "dtype", "decayed")]
    counts = {True: [0, 0], False: [0, 0]}
    for (path, leaf), flag in zip(leaves, flags, strict=True):
        shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
        dtype = getattr(leaf, "dtype", np.asarray(leaf).dtype)
        rows.append((path, str(shape), str(np.dtype(dtype)), "yes" if flag else "no"))
        counts[flag][0] += 1
        counts[flag][1] += math.prod(shape)
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        "  ".join(
            [*(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)), row[3]]
        )
        for row in rows
    ]
    total = [counts[True][0] + counts[False][0], counts[True][1] + counts[False][1]]
    digits = [len(f"{total[0]:,}"), len(f"{total[1]:,}")]
    for label, (n_leaves, n_params) in (
        ("decayed:", counts[True]),
        ("not decayed:", counts[False]),
        ("total:", total),
    ):
        lines.append(
            f"{label:<12} {n_leaves:>{digits[0]},} leaves, "
            f"{n_params:>{digits[1]},} parameters"
        )
    return "\n".join(line.rstrip() for line in lines)


def masked_weight_decay(
    weight_decay: optax.ScalarOrSchedule,
    mask: MaskOrFn | None = decay_mask,
) -> optax.GradientTransformationExtraArgs:
    """Goyal et al.'s coupled L2 weight decay on the masked leaves only.

    For each leaf ``w`` with gradient ``g``::

      g ← g + λ·w   where mask(w) is True
      g ← g         elsewhere

    Put it before momentum (``optax.chain(masked_weight_decay(1e-4), optax.sgd(...))``)
    to get the L2 term of the paper's loss, ``λ/2·‖w‖²``, folded into the gradient.
    Built as ``optax.masked(optax.add_decayed_weights(weight_decay), mask)``; the mask
    is rebuilt in the structure of each tree it is applied to, so it works with
    ``nnx.Optimizer`` (``Param``-wrapped leaves at ``init``, plain arrays at
    ``update``) whether ``mask`` is a function or a tree computed from
    ``nnx.state(model, nnx.Param)``. Updates keep their dtype (bf16 stays bf16).

    A schedule ``weight_decay`` is evaluated at the count of optimizer updates
    (``optax.MultiSteps`` advances it once per optimizer step, not per micro-batch).
    To wrap this transformation in ``optax.inject_hyperparams``, pass
    ``static_args=("mask",)``: a function mask would otherwise be taken for a
    schedule, and its value at the count (a bool) is refused with a ValueError
    rather than silently turning the decay off.

    Edge cases: ``weight_decay=0`` returns the updates unchanged; a mask that
    matches no leaf decays nothing.

    Args:
      weight_decay: λ, a number >= 0 or a schedule ``step -> λ``.
      mask: ``decay_mask`` (the default), another function of the params, a tree of
        bools (the structure of the params or a prefix of it), or None (decay
        every leaf). Use ``functools.partial(ow.decay_mask, exclude=...)`` to
        adjust the default.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Raises:
      ValueError: ``weight_decay`` is negative, NaN or infinite; ``mask`` is a bare
        bool or array (what ``inject_hyperparams`` makes of a mask function); at
        ``init`` or
        ``update``, the mask does not match the params (naming the first path that
        differs).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optax_warmup as ow
      >>> params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
      >>> tx = ow.masked_weight_decay(1e-4)
      >>> zeros = {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}
      >>> updates, _ = tx.update(zeros, tx.init(params), params)
      >>> updates["kernel"][0, 0].item(), updates["bias"][0].item()
      (9.999999747378752e-05, 0.0)

    References:
      Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
      arXiv:1706.02677, section 3 and 5.1; He et al. 2019, arXiv:1812.01187,
      section 3.1.
    """
    if not callable(weight_decay):
        check_real("weight_decay", weight_decay, low=0.0)
    if is_traced(mask) or isinstance(mask, bool | np.bool_ | jax.Array | np.ndarray):
        raise ValueError(
            "mask must be a function of the params, a tree of bools or None, got "
            f"{mask!r} (with optax.inject_hyperparams, pass static_args=('mask',))"
        )

    def mask_fn(tree: optax.Params) -> Any:
        return resolve_mask(mask, tree)

    inner = optax.masked(optax.add_decayed_weights(weight_decay), mask_fn)
    return keep_update_dtype(inner)
