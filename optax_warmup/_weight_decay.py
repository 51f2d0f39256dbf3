"""Weight decay that skips BatchNorm parameters and biases: the mask and the transform.

``decay_mask`` decides which leaves are decayed from their rank and their path;
``masked_weight_decay`` is ``optax.masked(optax.add_decayed_weights(...))`` with that
mask, made safe for ``flax.nnx``: the mask is rebuilt in the structure of whatever
tree optax hands it, so the ``Param``-wrapped tree that ``nnx.Optimizer`` gives to
``init`` and the plain arrays it gives to ``update`` get the same mask.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
import optax

from optax_warmup._stacked_layers import Stacked, describe_shape, layer_axes, leaf_shape
from optax_warmup._transforms import keep_update_dtype
from optax_warmup._tree_paths import flatten, whole_tree_paths
from optax_warmup._validation import check_real, is_traced

MaskOrFn = Any | Callable[[optax.Params], Any]


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


# Leaf names that flax's own layers give to biases (Linear, Conv, Einsum, attention's
# projections) and to normalisation parameters (LayerNorm, RMSNorm, BatchNorm,
# GroupNorm), in nnx and linen alike.
NO_DECAY_NAMES = ("bias", "scale")


def _decisions(
    params: optax.Params,
    exclude: str | Iterable[str] = (),
    include: str | Iterable[str] = (),
    stacked: Stacked | None = None,
) -> tuple[list[tuple[str, Any, int, bool, str]], Any]:
    """Per leaf: (path, leaf, stacked axes, decayed, the rule that decided)."""
    exclude_res = _compile("exclude", exclude)
    include_res = _compile("include", include)
    leaves, treedef = flatten(params)
    # Patterns are checked against the whole tree: in a branch of multi_transform
    # the other branches' leaves are MaskedNodes, which still have their paths.
    paths = whole_tree_paths(params)
    for name, regexes in (("exclude", exclude_res), ("include", include_res)):
        for regex in regexes:
            if not any(regex.search(path) for path in paths):
                raise ValueError(
                    f"{name} pattern {regex.pattern!r} matches no parameter path "
                    f"(paths look like {paths[:3]!r})"
                )
    rows = []
    axes = layer_axes(leaves, stacked, paths)
    for (path, leaf), layers in zip(leaves, axes, strict=True):
        rank = len(leaf_shape(leaf)) - layers
        if path.rsplit("/", 1)[-1] in NO_DECAY_NAMES:  # 1) name
            decayed, why = False, "bias or norm"
        else:  # 2) rank of one layer
            decayed, why = rank >= 2, f"rank {rank}"
        if any(regex.search(path) for regex in exclude_res):  # 3) exclude
            decayed, why = False, "exclude"
        if any(regex.search(path) for regex in include_res):  # 4) include
            decayed, why = True, "include"
        rows.append((path, leaf, layers, decayed, why))
    return rows, treedef


def decay_mask(
    params: optax.Params,
    *,
    exclude: str | Iterable[str] = (),
    include: str | Iterable[str] = (),
    stacked: Stacked | None = None,
) -> Any:
    """Which parameters get weight decay: kernels yes, norm parameters and biases no.

    Each leaf is decided in four rules, later rules winning:

    1) name: ``False`` (not decayed) for a leaf named ``bias`` or ``scale``, the
       names that flax's layers give to biases and to the parameters of
       ``LayerNorm``, ``RMSNorm``, ``BatchNorm`` and ``GroupNorm`` (nnx and linen),
       whatever its rank, also for the ``(L, C)`` biases and norm scales of L stacked
       layers and the ``(heads, head_dim)`` biases of attention. Goyal et al. apply no
       weight decay to BN's γ and β and say nothing of biases; skipping biases is He
       et al. 2019's "no bias decay" (and common practice);
    2) rank, for every other leaf: ``True`` (decayed) when one layer of it has
       ``ndim >= 2`` (conv and dense kernels, embeddings), ``False`` otherwise;
    3) ``exclude``: ``False`` when the leaf's path matches one of these patterns;
    4) ``include``: ``True`` when the leaf's path matches one of these patterns.

    One layer's rank is the leaf's ``ndim`` less its stacked axes, which
    ``stacked`` declares: ``{"blocks": 1}`` says that every leaf whose path
    contains ``blocks`` stacks its layers on its first axis (``nnx.vmap`` +
    ``nnx.scan``, linen's ``nn.scan``). Without it, the name rule already keeps the
    stacked biases and norm parameters of flax's layers undecayed; ``stacked`` only
    changes leaves with other names (a stacked ``(L, C)`` gain of your own).

    Embeddings (``nnx.Embed``/``nn.Embed``'s ``embedding``, rank 2) are decayed, as
    in GPT-2 and HF transformers' ``Trainer``; ``exclude=r"embed"`` keeps them out.

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
    gives an empty mask.

    Args:
      params: a tree of arrays (or of shapes), possibly of ``nnx.Variable``.
      exclude: a regular expression or a sequence of them: matching leaves are not
        decayed.
      include: a regular expression or a sequence of them: matching leaves are
        decayed (even if excluded or named ``bias``/``scale``).
      stacked: a mapping from path patterns to the number of leading axes that
        stack layers in the matching leaves, or None (no stacked layers).

    Returns:
      A tree of Python bools, ``True`` where weight decay applies.

    Inside ``optax.multi_transform`` (or ``optax.masked``) each branch is given the
    whole tree with the other branches' leaves masked out; a pattern is checked
    against the paths of that whole tree, so one ``partial(ow.decay_mask,
    exclude=...)`` serves every branch. (A label tree given as a prefix, such as
    ``{"backbone": "sgd", "head": "adam"}``, hides the paths below its labels from
    the other branches: give a label per leaf, or a function of the params.)

    Raises:
      ValueError: a pattern is not a valid regular expression, or matches no path
        of the whole tree (a typo must not silently decay everything), or
        ``stacked`` gives a leaf more stacked axes than it has; the message names
        it.

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
      >>> stack = {"blocks": {"ln": {"scale": jnp.ones((4, 8))},
      ...                     "fc": {"kernel": jnp.ones((4, 8, 8))}}}
      >>> ow.decay_mask(stack)  # 4 stacked layers: the norm scale is not decayed
      {'blocks': {'fc': {'kernel': True}, 'ln': {'scale': False}}}

    References:
      Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
      arXiv:1706.02677, section 5.1; He et al. 2019, Bag of Tricks for Image
      Classification with Convolutional Neural Networks, arXiv:1812.01187,
      section 3.1.
    """  # noqa: E501
    rows, treedef = _decisions(params, exclude, include, stacked)
    return jax.tree_util.tree_unflatten(treedef, [row[3] for row in rows])


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


def with_stacked(mask: MaskOrFn | None, stacked: Stacked | None) -> MaskOrFn | None:
    """``mask`` with ``stacked`` given to it, when it is a function that takes it.

    The one place where the recipes, their trust ratios and ``decay_report`` decide
    what mask they apply, so that they never disagree: ``decay_mask``, a
    ``functools.partial`` of it and a function of one's own with a ``stacked``
    keyword get ``stacked``; a partial that binds its own ``stacked`` keeps it; a
    tree of bools, None and a function without the keyword are returned as given.
    """
    if not stacked or not callable(mask):
        return mask
    if isinstance(mask, functools.partial) and "stacked" in mask.keywords:
        return mask
    try:
        parameter = inspect.signature(mask).parameters.get("stacked")
    except (TypeError, ValueError):  # a callable without a signature
        return mask
    if parameter is None or parameter.kind not in (
        inspect.Parameter.KEYWORD_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        return mask
    fn: Callable[..., Any] = mask
    return functools.partial(fn, stacked=stacked)


def _report_rows(
    params: optax.Params, mask: MaskOrFn | None, stacked: Stacked | None
) -> list[tuple[str, Any, int, bool, str]]:
    """The rows of ``decay_report``: the rule that decided, where it is known."""
    mask = with_stacked(mask, stacked)
    if mask is decay_mask:
        return _decisions(params)[0]
    if (
        isinstance(mask, functools.partial)
        and mask.func is decay_mask
        and not mask.args
    ):
        return _decisions(params, **mask.keywords)[0]
    leaves, _ = flatten(params)
    flags = [flag for _, flag in flatten(resolve_mask(mask, params))[0]]
    axes = layer_axes(leaves, stacked, whole_tree_paths(params))
    return [
        (path, leaf, n, flag, "mask")
        for (path, leaf), n, flag in zip(leaves, axes, flags, strict=True)
    ]


def decay_report(
    params: optax.Params,
    mask: MaskOrFn | None = decay_mask,
    *,
    stacked: Stacked | None = None,
) -> str:
    """A table of which parameters are decayed, and why, to read before training.

    One row per leaf: its path, its shape (``4 × (16, 16)`` for 4 stacked layers of
    ``(16, 16)``), dtype, whether it is decayed and the rule of ``decay_mask`` that
    decided (``bias or norm``, ``rank N`` of one layer, ``exclude``, ``include``;
    ``mask`` for a mask of your own); then the totals of leaves and of parameters
    (elements), decayed and not.

    Give it the ``mask`` and ``stacked`` that the optimizer gets, and it shows what
    the optimizer does: the recipes pass ``stacked`` to their mask the same way (to
    ``decay_mask``, to a ``functools.partial`` of it and to any mask function with
    a ``stacked`` keyword).

    Args:
      params: a tree of arrays or of ``jax.ShapeDtypeStruct`` (from
        ``jax.eval_shape``), possibly of ``nnx.Variable``.
      mask: what ``masked_weight_decay`` would get: ``decay_mask`` (the default), a
        function of ``params`` (such as ``functools.partial(ow.decay_mask,
        exclude=...)``), a tree of bools, or None for every leaf (as in
        ``masked_weight_decay``, the recipes and optax).
      stacked: the stacked layers, as for ``decay_mask``; passed to ``mask`` when it
        takes a ``stacked`` keyword (a ``partial`` of ``decay_mask`` with its own
        ``stacked`` keeps it).

    Returns:
      The table as a string: ``print(ow.decay_report(params))``.

    Raises:
      ValueError: the mask does not match ``params`` (naming the first path that
        differs), or ``decay_mask`` refuses a pattern.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_warmup as ow
      >>> params = {"conv": {"kernel": jnp.ones((3, 3, 1, 8)), "bias": jnp.ones(8)},
      ...           "bn": {"scale": jnp.ones(8), "bias": jnp.ones(8)}}
      >>> print(ow.decay_report(params))
      path         shape         dtype    decayed  rule
      bn/bias      (8,)          float32  no       bias or norm
      bn/scale     (8,)          float32  no       bias or norm
      conv/bias    (8,)          float32  no       bias or norm
      conv/kernel  (3, 3, 1, 8)  float32  yes      rank 4
      decayed:     1 leaves, 72 parameters
      not decayed: 3 leaves, 24 parameters
      total:       4 leaves, 96 parameters

    References:
      Goyal et al. 2017, arXiv:1706.02677, section 5.1; He et al. 2019,
      arXiv:1812.01187, section 3.1.
    """
    rows = [("path", "shape", "dtype", "decayed", "rule")]
    counts = {True: [0, 0], False: [0, 0]}
    for path, leaf, layers, flag, why in _report_rows(params, mask, stacked):
        shape = leaf_shape(leaf)
        dtype = getattr(leaf, "dtype", np.asarray(leaf).dtype)
        rows.append(
            (
                path,
                describe_shape(shape, layers),
                str(np.dtype(dtype)),
                "yes" if flag else "no",
                why,
            )
        )
        counts[flag][0] += 1
        counts[flag][1] += math.prod(shape)
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(
            [*(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)), row[4]]
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
        ``init`` or ``update``, the mask does not match the params (naming the
        first path that differs).

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
