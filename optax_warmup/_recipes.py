"""Optimizers with the large-batch recipe built in: SGD, LARS, LAMB, AdamW, goyal_sgd.

One builder makes them all: the optimizer's parts are chained in one function of the
hyperparameters (weight decay on the masked leaves, placed where the optimizer puts
it), ``optax.inject_hyperparams`` keeps the learning rate and the weight decay in the
state (so either may be a schedule, ``ow.current_lr`` reads the rate and a
checkpoint resumes exactly), and the updates leave with the dtype they came in with.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike, DTypeLike

from optax_warmup._batch_rates import BatchScaledRate
from optax_warmup._schedules import goyal_schedule
from optax_warmup._stacked_layers import Stacked, check_stacked
from optax_warmup._transforms import keep_update_dtype, scale_and_trace
from optax_warmup._trust_ratio import scale_by_trust_ratio
from optax_warmup._validation import check_real, is_traced
from optax_warmup._weight_decay import (
    MaskOrFn,
    decay_mask,
    masked_weight_decay,
    with_stacked,
)


def _is_static_zero(value: Any) -> bool:
    """True for a weight decay given as the number 0 (not a schedule, not traced)."""
    return (
        not callable(value) and not is_traced(value) and float(np.asarray(value)) == 0
    )


def _as_float(value: Any, dtype: DTypeLike) -> Any:
    """A rate or decay as the state keeps it: an array of ``dtype`` (1 is 1.0), or a
    schedule whose values are."""
    if isinstance(value, optax.schedules.StatefulSchedule):
        return value
    if callable(value):
        return lambda count: jnp.asarray(value(count), dtype)
    return jnp.asarray(value, dtype)


def _recipe(
    parts: Callable[..., optax.GradientTransformation],
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule,
    mask: MaskOrFn | None,
    stacked: Stacked | None,
    *,
    trust_ratio: bool,
    **static: Any,
) -> optax.GradientTransformationExtraArgs:
    """``parts(learning_rate, weight_decay, mask=..., stacked=..., decays=...,
    **static)`` with the rate and the decay injected and the updates' dtypes kept.

    Only the rate and the decay are injected (kept in the state, so that either may
    be a schedule), as floats of at least 32 bits whatever the params' dtype (an
    integer rate 1 is 1.0). The other hyperparameters are static Python numbers:
    optax's ``inject_hyperparams`` would round them to the params' dtype, and in
    bfloat16 Adam's ``b2 = 0.999`` is 1.0. (Adam's moments are arrays of the
    params' dtype all the same, as in optax: see ``adamw``.)

    The mask is resolved once, ``with_stacked``, as ``decay_report`` resolves it. A
    weight decay given as the number 0 builds no decay at all (``decays=False``),
    so that without a trust ratio ``update`` needs no params, as in optax.
    """
    follows_batch = isinstance(learning_rate, BatchScaledRate)
    if not callable(learning_rate):
        check_real("learning_rate", learning_rate, low=0.0)
    if not callable(weight_decay):
        check_real("weight_decay", weight_decay, low=0.0)
    if stacked is not None:
        check_stacked(stacked)
    mask = with_stacked(mask, stacked)
    decays = not _is_static_zero(weight_decay)
    static = {**static, "mask": mask, "stacked": stacked, "decays": decays}
    needs = [
        need
        for need, needed in (("weight decay", decays), ("trust ratio", trust_ratio))
        if needed
    ]

    def injected(tree: Any, rate: Any) -> optax.GradientTransformationExtraArgs:
        dtype = jnp.promote_types(optax.tree.dtype(tree, "highest"), jnp.float32)
        inject = optax.inject_hyperparams(
            parts, static_args=tuple(static), hyperparam_dtype=dtype
        )
        return inject(
            learning_rate=_as_float(rate, dtype),
            weight_decay=_as_float(weight_decay, dtype),
            **static,
        )

    def init_fn(params):
        rate = learning_rate
        if follows_batch:  # before any update: the base batch's rate at 0 samples
            start = learning_rate.schedule(jnp.zeros([], jnp.int32))
            rate = lambda _: start  # noqa: E731
        return injected(params, rate).init(params)

    def update_fn(updates, state, params=None, **extra_args):
        if params is None and needs:
            hint = " (or build it with weight_decay=0)" if decays else ""
            raise ValueError(
                f"this optimizer needs the params for its {' and '.join(needs)}: "
                f"call update(grads, state, params){hint}"
            )
        rate = learning_rate
        if follows_batch:  # the rate of this update's batch and consumed samples
            value = learning_rate.at_update(extra_args)
            rate = lambda _: value  # noqa: E731
        tree = updates if params is None else params
        return injected(tree, rate).update(updates, state, params, **extra_args)

    return keep_update_dtype(optax.GradientTransformationExtraArgs(init_fn, update_fn))


def _decay(weight_decay, mask, decays):
    """The masked weight decay as a list of parts: empty when there is none."""
    return [masked_weight_decay(weight_decay, mask)] if decays else []


def _sgd_parts(learning_rate, weight_decay, momentum, nesterov, mask, stacked, decays):
    del stacked  # only the mask reads it, and with_stacked gave it
    return optax.chain(
        *_decay(weight_decay, mask, decays),
        # optax keeps no velocity for momentum=None; 0 would keep one of zeros.
        optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov),
    )


def _lars_parts(
    learning_rate,
    weight_decay,
    momentum,
    nesterov,
    trust_coefficient,
    eps,
    momentum_correction,
    mask,
    stacked,
    decays,
):
    return optax.chain(
        *_decay(weight_decay, mask, decays),
        scale_by_trust_ratio(trust_coefficient, eps, mask=mask, stacked=stacked),
        scale_and_trace(learning_rate, momentum, nesterov, momentum_correction),
    )


def _lamb_parts(
    learning_rate, weight_decay, b1, b2, eps, eps_root, mu_dtype, mask, stacked, decays
):
    return optax.chain(
        optax.scale_by_adam(
            b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype
        ),
        *_decay(weight_decay, mask, decays),
        scale_by_trust_ratio(mask=mask, stacked=stacked),
        optax.scale_by_learning_rate(learning_rate),
    )


def _adamw_parts(
    learning_rate,
    weight_decay,
    b1,
    b2,
    eps,
    eps_root,
    mu_dtype,
    nesterov,
    mask,
    stacked,
    decays,
):
    del stacked  # only the mask reads it, and with_stacked gave it
    return optax.chain(
        optax.scale_by_adam(
            b1=b1,
            b2=b2,
            eps=eps,
            eps_root=eps_root,
            mu_dtype=mu_dtype,
            nesterov=nesterov,
        ),
        *_decay(weight_decay, mask, decays),
        optax.scale_by_learning_rate(learning_rate),
    )


def _check_momentum(momentum: ArrayLike) -> None:
    check_real("momentum", momentum, low=0.0, high=1.0, high_open=True)


def _check_betas(
    b1: ArrayLike, b2: ArrayLike, eps: ArrayLike, eps_root: ArrayLike
) -> None:
    check_real("b1", b1, low=0.0, high=1.0, high_open=True)
    check_real("b2", b2, low=0.0, high=1.0, high_open=True)
    check_real("eps", eps, low=0.0)
    check_real("eps_root", eps_root, low=0.0)


def sgd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: MaskOrFn | None = decay_mask,
    stacked: Stacked | None = None,
) -> optax.GradientTransformationExtraArgs:
    """SGD, momentum 0.9 and weight decay 1e-4 on kernels only (optax.sgd: neither).

    SGD with momentum and L2 weight decay on kernels only, as Goyal et al. train;
    its defaults are theirs, not ``optax.sgd``'s (no momentum, no decay): for
    ``optax.sgd(η)`` step for step, write ``ow.sgd(η, momentum=0, weight_decay=0)``.

    Per step, for each parameter ``w`` with gradient ``g``::

      g ← g + λ·w          only where mask(w) (not BatchNorm γ, β nor biases)
      v ← m·v + g
      w ← w − η(t)·v

    ``optax.sgd`` with ``optax.masked(optax.add_decayed_weights(λ), mask)`` in front
    of it (``optax.sgd`` has no weight decay). The rate stays outside the velocity
    ``v``, the reference form of Goyal et al. (their eq. (9), section 3): when ``η``
    changes (warmup, milestones) no momentum correction is needed.

    Edge cases: ``momentum=0`` is plain SGD and keeps no velocity (as
    ``optax.sgd(momentum=None)``); ``weight_decay=0`` (a number) builds no decay, and
    ``update`` then needs no ``params``.

    Args:
      learning_rate: η, a number >= 0 or any schedule (``ow.goyal_schedule``,
        ``ow.wsd_schedule``, optax's).
      momentum: m, in [0, 1); default 0.9.
      nesterov: Nesterov momentum.
      weight_decay: λ, a number >= 0 or a schedule; default 1e-4 (Goyal et al.).
      mask: which leaves are decayed: ``decay_mask`` (default), a function, a tree
        of bools, or None for all (see ``masked_weight_decay``).
      stacked: stacked layers, given to the mask (``decay_mask``, a
        ``functools.partial`` of it, or any mask function with a ``stacked``
        keyword; see ``decay_mask``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
      unless ``weight_decay=0``.

    Raises:
      ValueError: ``learning_rate``, ``momentum`` or ``weight_decay`` out of range or
        NaN; the message names it.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optax_warmup as ow
      >>> tx = ow.sgd(0.1)
      >>> params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
      >>> updates, state = tx.update({"kernel": jnp.zeros((2, 2)),
      ...                             "bias": jnp.zeros(2)}, tx.init(params), params)
      >>> float(updates["kernel"][0, 0]), float(updates["bias"][0])  # −η·λ·w, 0
      (-9.999999747378752e-06, -0.0)

    References:
      Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
      arXiv:1706.02677, sections 3 and 5.1; He et al. 2019, Bag of Tricks for
      Image Classification with Convolutional Neural Networks, arXiv:1812.01187,
      section 3.1 (no bias decay).
    """
    _check_momentum(momentum)
    return _recipe(
        _sgd_parts,
        learning_rate,
        weight_decay,
        mask,
        stacked,
        trust_ratio=False,
        momentum=momentum,
        nesterov=nesterov,
    )


def lars(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    momentum_correction: bool = False,
    mask: MaskOrFn | None = decay_mask,
    stacked: Stacked | None = None,
) -> optax.GradientTransformationExtraArgs:
    """LARS, momentum 0.9 and weight decay 1e-4 on kernels only (optax.lars: no decay).

    LARS with weight decay and the trust ratio on kernels only; ``optax.lars``
    decays nothing by default and applies its trust ratio to every leaf.

    Per step, for each parameter ``w`` with gradient ``g``; where mask(w)::

      d ← g + λ·w
      d ← c·‖w‖ / (‖d‖ + eps) · d        (1 instead where ‖w‖ or ‖d‖ is 0)

    elsewhere (BatchNorm γ, β, biases) ``d ← g``, plain momentum SGD at the global
    rate; then for all::

      u ← m·u − η(t)·d,   w ← w + u

    One ``mask`` decides both the decay and the trust ratio, as the MLPerf ResNet-50
    reference does; ``optax.lars`` applies both to every leaf unless given two
    masks, and with ``weight_decay_mask=m, trust_ratio_mask=m`` it equals this step
    for step. Norms are per layer for leaves that ``stacked`` declares stacked (an
    ``(L, C_in, C_out)`` kernel gets L ratios), so L stacked layers train as the
    same L layers unstacked. The trust ratio uses ``‖g + λw‖`` as optax does; You
    et al. write ``‖g‖ + λ‖w‖``.

    The rate is inside the velocity ``u`` (optax's LARS form). When it changes,
    Goyal et al. (section 3, remark 2) prescribe the momentum correction: with
    ``momentum_correction=True``, ``u ← m·(η(t)/η(t−1))·u − η(t)·d``, so a ×0.1
    milestone shrinks the next update tenfold at once instead of over ~1/(1−m)
    steps. Off by default, as in optax.

    Edge cases: ``momentum=0`` keeps no velocity; ``weight_decay=0`` (a number)
    builds no decay. ``update`` always needs ``params``: the trust ratio reads
    ``‖w‖``.

    Args:
      learning_rate: η, a number >= 0 or a schedule.
      momentum: m, in [0, 1); default 0.9.
      nesterov: Nesterov momentum.
      weight_decay: λ, a number >= 0 or a schedule; default 1e-4.
      trust_coefficient: c, > 0 (0.001 in You et al.).
      eps: added to the denominator of the ratio, >= 0.
      momentum_correction: rescale ``u`` by ``η(t)/η(t−1)`` when the rate changes.
      mask: which leaves get decay and trust ratio: ``decay_mask`` (default), a
        function, a tree of bools, or None for all (``optax.lars``'s default).
      stacked: stacked layers, for the per-layer norms and the mask (given to
        ``decay_mask``, a ``functools.partial`` of it, or any mask function with a
        ``stacked`` keyword; see ``decay_mask``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Raises:
      ValueError: an argument out of range or NaN; the message names it.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_warmup as ow
      >>> tx = ow.lars(1.0, weight_decay=0.0, trust_coefficient=0.01)
      >>> params = {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.ones(2)}
      >>> grads = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> float(updates["kernel"][0, 0]), float(updates["bias"][0])  # −0.01·6/2, −1
      (-0.029999999329447746, -1.0)

    References:
      You, Gitman, Ginsburg 2017, Large Batch Training of Convolutional Networks,
      arXiv:1708.03888; Goyal et al. 2017, arXiv:1706.02677, section 3 (remark 2).
    """
    _check_momentum(momentum)
    check_real("trust_coefficient", trust_coefficient, low=0.0, low_open=True)
    check_real("eps", eps, low=0.0)
    return _recipe(
        _lars_parts,
        learning_rate,
        weight_decay,
        mask,
        stacked,
        trust_ratio=True,
        momentum=momentum,
        nesterov=nesterov,
        trust_coefficient=trust_coefficient,
        eps=eps,
        momentum_correction=momentum_correction,
    )


def lamb(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    mu_dtype: DTypeLike | None = None,
    weight_decay: optax.ScalarOrSchedule = 0.01,
    mask: MaskOrFn | None = decay_mask,
    stacked: Stacked | None = None,
) -> optax.GradientTransformationExtraArgs:
    """LAMB, weight decay 0.01 and trust ratio on kernels only (optax.lamb: no decay).

    LAMB with weight decay and the trust ratio on kernels only; the decay 0.01 is You
    et al.'s, where ``optax.lamb`` decays nothing by default (and masks no trust
    ratio). With Adam's bias-corrected moments ``m̂``, ``v̂`` of the gradient, per
    leaf ``w``::

      r ← m̂ / (sqrt(v̂ + eps_root) + eps)
      r ← r + λ·w,  r ← ‖w‖ / ‖r‖ · r     only where mask(w); ratio 1 if a norm is 0
      w ← w − η(t)·r

    so BatchNorm γ, β and biases get a plain Adam step at the global rate. It is
    ``optax.chain(optax.scale_by_adam(b1, b2, eps, eps_root, mu_dtype),
    optax.add_decayed_weights(λ, mask), optax.masked(optax.scale_by_trust_ratio(),
    mask), optax.scale_by_learning_rate(η))``, which ``optax.lamb`` cannot express:
    its trust ratio has no mask. Norms are per layer for leaves that ``stacked``
    declares stacked. The moments' dtypes are optax's (see ``adamw``: keep float32
    master weights).

    Args:
      learning_rate: η, a number >= 0 or a schedule.
      b1: Adam's first-moment decay, in [0, 1).
      b2: Adam's second-moment decay, in [0, 1).
      eps: Adam's epsilon, >= 0 (1e-6 in You et al.).
      eps_root: added to ``v̂`` inside the square root, >= 0 (as in optax).
      mu_dtype: the dtype of the first moment (None: the params' dtype, as in optax).
      weight_decay: λ, a number >= 0 or a schedule; default 0.01 (You et al.).
      mask: which leaves get decay and trust ratio: ``decay_mask`` (default), a
        function, a tree of bools, or None for all.
      stacked: stacked layers, for the per-layer norms and the mask (as in
        ``lars``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params`` (the
      trust ratio reads ``‖w‖``).

    Raises:
      ValueError: an argument out of range or NaN; the message names it.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_warmup as ow
      >>> tx = ow.lamb(0.1, weight_decay=0.0)
      >>> params = {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.ones(2)}
      >>> grads = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> round(float(updates["kernel"][0, 0]), 4), round(float(updates["bias"][0]), 4)
      (-0.3, -0.1)

    References:
      You et al. 2019, Large Batch Optimization for Deep Learning: Training BERT in
      76 minutes, arXiv:1904.00962.
    """
    _check_betas(b1, b2, eps, eps_root)
    return _recipe(
        _lamb_parts,
        learning_rate,
        weight_decay,
        mask,
        stacked,
        trust_ratio=True,
        b1=b1,
        b2=b2,
        eps=eps,
        eps_root=eps_root,
        mu_dtype=mu_dtype,
    )


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: DTypeLike | None = None,
    nesterov: bool = False,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: MaskOrFn | None = decay_mask,
    stacked: Stacked | None = None,
) -> optax.GradientTransformationExtraArgs:
    """AdamW, weight decay 1e-4 on kernels only (optax.adamw: 1e-4 on every leaf).

    ``w ← w − η(t)·(m̂ / (sqrt(v̂ + eps_root) + eps) + λ·w)``, the ``λ·w`` term
    only where mask(w): ``optax.adamw(η, b1, b2, eps, eps_root, mu_dtype,
    weight_decay=λ, mask=mask, nesterov=nesterov)`` with ``decay_mask`` as the
    default mask (optax's default decays every leaf, BatchNorm parameters and
    biases too). The decay is multiplied by the rate, as in optax and PyTorch.

    Precision: the rate and the decay are kept in at least float32. Adam's first
    moment has ``mu_dtype`` (the params' dtype when None) and its second moment
    the params' dtype, as in ``optax.scale_by_adam``: with bfloat16 params the
    second moment is bfloat16, where ``0.999·v`` rounds back to ``v``, so it stops
    decaying (in optax too), and ``mu_dtype`` does not change that. Keep float32
    master weights: float32 params and bfloat16 computation (``param_dtype``
    float32 and ``dtype=jnp.bfloat16`` in flax, as ``ow.models`` do by default);
    both moments are then float32, and ``mu_dtype=jnp.bfloat16`` halves the first
    moment's memory.

    Edge cases: ``weight_decay=0`` (a number) builds no decay; it is then
    ``optax.adam`` and ``update`` needs no ``params``.

    Args:
      learning_rate: η, a number >= 0 or a schedule.
      b1: Adam's first-moment decay, in [0, 1).
      b2: Adam's second-moment decay, in [0, 1).
      eps: Adam's epsilon, >= 0.
      eps_root: added to ``v̂`` inside the square root, >= 0 (as in optax).
      mu_dtype: the dtype of the first moment (None: the params' dtype, as in optax).
      nesterov: Nesterov momentum (NAdam), as in ``optax.adamw``.
      weight_decay: λ, a number >= 0 or a schedule; default 1e-4 (as in optax).
      mask: which leaves are decayed: ``decay_mask`` (default), a function, a tree
        of bools, or None for all (optax's default).
      stacked: stacked layers, given to the mask (as in ``sgd``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
      unless ``weight_decay=0``.

    Raises:
      ValueError: an argument out of range or NaN; the message names it.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_warmup as ow
      >>> tx = ow.adamw(0.1, weight_decay=0.5)
      >>> params = {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.ones(2)}
      >>> grads = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> round(float(updates["kernel"][0, 0]), 4), round(float(updates["bias"][0]), 4)
      (-0.2, -0.1)

    References:
      Loshchilov & Hutter 2019, Decoupled Weight Decay Regularization,
      arXiv:1711.05101.
    """
    _check_betas(b1, b2, eps, eps_root)
    return _recipe(
        _adamw_parts,
        learning_rate,
        weight_decay,
        mask,
        stacked,
        trust_ratio=False,
        b1=b1,
        b2=b2,
        eps=eps,
        eps_root=eps_root,
        mu_dtype=mu_dtype,
        nesterov=nesterov,
    )


def goyal_sgd(
    batch_size: int,
    steps_per_epoch: int,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: MaskOrFn | None = decay_mask,
    stacked: Stacked | None = None,
    **schedule_args: Any,
) -> optax.GradientTransformationExtraArgs:
    """SGD, momentum 0.9, weight decay 1e-4 on kernels and Goyal et al.'s schedule.

    SGD with momentum as Goyal et al. trained ResNet-50 with minibatches of 8k:
    ``ow.sgd(ow.goyal_schedule(batch_size, steps_per_epoch, **schedule_args),
    momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, mask=mask,
    stacked=stacked)``: the linear scaling rule (``base_lr · batch_size /
    base_batch_size``), a gradual warmup over ``warmup_epochs``, × ``decay_factor``
    at each of ``milestones`` (epochs), and L2 weight decay on kernels only. Every
    keyword argument of ``goyal_schedule`` (``base_lr``, ``base_batch_size``,
    ``warmup_epochs``, ``milestones``, ``decay_factor``, ``warmup``) is passed to
    it, with its defaults; ``help(ow.goyal_sgd)`` shows them in the signature.

    The schedule counts optimizer updates: under ``optax.MultiSteps(tx, k)`` it
    advances once every ``k`` micro-batches, so give ``batch_size`` as the batch of
    one update (``k`` micro-batches) and ``steps_per_epoch`` in updates.

    Edge cases: the first update uses ``base_lr`` (``warmup="gradual"``; the scaled
    rate when ``batch_size < base_batch_size``, see ``goyal_schedule``), the update
    of count ``warmup_epochs · steps_per_epoch`` the full rate.

    Args:
      batch_size: the global minibatch size kn of one update (> 0).
      steps_per_epoch: optimizer updates per epoch (an integer > 0).
      momentum: m, in [0, 1); default 0.9.
      nesterov: Nesterov momentum (Goyal et al. used it, noting that standard
        momentum is equally effective; section 5.1).
      weight_decay: λ, a number >= 0 or a schedule; default 1e-4 (the paper's).
      mask: which leaves are decayed (see ``sgd``).
      stacked: stacked layers, given to the mask (see ``sgd``).
      **schedule_args: the keyword arguments of ``goyal_schedule``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
      unless ``weight_decay=0``.

    Raises:
      ValueError: any argument that ``sgd`` or ``goyal_schedule`` rejects.
      TypeError: a keyword argument that neither takes.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import optax_warmup as ow
      >>> tx = ow.goyal_sgd(batch_size=8192, steps_per_epoch=156)
      >>> params = {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.zeros_like, params)
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> float(ow.current_lr(state)), params["kernel"][0, 0].item()  # 1 - 0.1·1e-4
      (0.10000000149011612, 0.9999899864196777)

    References:
      Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
      arXiv:1706.02677, sections 2, 3 and 5.1.
    """
    schedule = goyal_schedule(batch_size, steps_per_epoch, **schedule_args)
    return sgd(
        schedule,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
        mask=mask,
        stacked=stacked,
    )


def _with_schedule_signature(recipe: Callable[..., Any]) -> None:
    """Shows ``goyal_schedule``'s keyword arguments in ``recipe``'s signature."""
    own = inspect.signature(recipe)
    keywords = [
        p
        for p in inspect.signature(goyal_schedule).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    parameters = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
    recipe.__signature__ = own.replace(parameters=[*parameters, *keywords])  # type: ignore[attr-defined]


_with_schedule_signature(goyal_sgd)
