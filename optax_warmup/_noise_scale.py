"""The gradient noise scale of McCandlish et al. 2018, measured inside a train step.

The simple noise scale ``B_simple = tr(Σ) / |G|²`` (Σ the covariance of the
per-example gradients, G their mean) predicts the critical batch size: the batch
beyond which a larger batch buys fewer and fewer steps. Gradients averaged over
batches of two sizes give unbiased estimates of both terms (``noise_scale_estimates``).
One backward pass gives both sizes: the gradients of G equal groups of the batch
(``value_and_grad_by_group``, or the devices of a data-parallel mesh), whose mean is
the whole batch's gradient (``average_group_grads``). ``track_noise_scale`` keeps
moving averages of the two estimates in the optimizer state, and
``current_noise_scale`` reads ``B_simple`` back out of any nesting of states.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from optax_warmup._tree_paths import flatten, unwrap
from optax_warmup._validation import check_int, check_real, concrete


def _check_sizes(b_small: Any, b_big: Any) -> None:
    check_int("b_small", b_small, low=1)
    check_int("b_big", b_big, low=1)
    small, big = concrete(b_small), concrete(b_big)
    if small is not None and big is not None and small >= big:
        raise ValueError(
            "b_small must be smaller than b_big (the batch of each group, then the "
            f"whole batch), got b_small={b_small!r}, b_big={b_big!r}"
        )


def noise_scale_estimates(
    small_sq_norm: ArrayLike,
    big_sq_norm: ArrayLike,
    b_small: ArrayLike,
    b_big: ArrayLike,
) -> tuple[jax.Array, jax.Array]:
    r"""Unbiased estimates of ``|G|²`` and ``tr(Σ)`` from two batch sizes.

    A gradient averaged over ``B`` independent examples has
    :math:`\mathbb{E}|G_B|^2 = |G|^2 + \mathrm{tr}(\Sigma)/B`. Solving this at
    ``b_small`` and ``b_big`` gives McCandlish et al.'s estimates (their A.1):

    .. math::

      \widehat{|G|^2} = \frac{B_{big} |G_{big}|^2 - B_{small} |G_{small}|^2}
        {B_{big} - B_{small}}, \qquad
      \widehat{\mathrm{tr}\,\Sigma} = \frac{|G_{small}|^2 - |G_{big}|^2}
        {1/B_{small} - 1/B_{big}}.

    Each is unbiased, not positive: on one step either may be negative. Their
    ratio is biased and noisy; the paper (and ``track_noise_scale``) averages each
    over steps and divides the averages. Elementwise in the norms (arrays
    broadcast, ``vmap`` maps), in at least float32.

    Args:
      small_sq_norm: :math:`|G_{small}|^2`, the squared norm of a gradient averaged
        over ``b_small`` examples (or the mean of several such squared norms, as
        ``average_group_grads`` returns).
      big_sq_norm: :math:`|G_{big}|^2`, the squared norm of the gradient averaged
        over ``b_big`` examples.
      b_small: the small batch size, an integer >= 1.
      b_big: the big batch size, an integer > ``b_small``.

    Returns:
      ``(g2, trace_sigma)``: the estimates of :math:`|G|^2` and
      :math:`\mathrm{tr}(\Sigma)`.

    Raises:
      ValueError: ``b_small`` or ``b_big`` is not an integer >= 1, or
        ``b_small >= b_big``; the message names them. Traced sizes (under ``jit``
        or ``vmap``) are not checked: equal sizes give inf or NaN.

    Example:
      >>> import optax_warmup as ow
      >>> g2, trace_sigma = ow.noise_scale_estimates(3.0, 1.5, b_small=8, b_big=32)
      >>> float(g2), float(trace_sigma), float(trace_sigma / g2)
      (1.0, 16.0, 16.0)

    References:
      McCandlish et al. 2018, An Empirical Model of Large-Batch Training,
      arXiv:1812.06162, appendix A.1.
    """
    _check_sizes(b_small, b_big)
    dtype = jnp.promote_types(jnp.result_type(small_sq_norm, big_sq_norm), jnp.float32)
    small = jnp.asarray(small_sq_norm, dtype)
    big = jnp.asarray(big_sq_norm, dtype)
    bs = jnp.asarray(b_small, dtype)
    bb = jnp.asarray(b_big, dtype)
    g2 = (bb * big - bs * small) / (bb - bs)
    trace_sigma = (small - big) / (1 / bs - 1 / bb)
    return g2, trace_sigma


def _sq_norm(tree: Any, axis: int | None) -> jax.Array:
    """Σ over leaves of Σ over all axes but ``axis`` of x², in at least float32."""
    total = jnp.zeros([], jnp.float32)
    for leaf in jax.tree.leaves(tree):
        x = jnp.asarray(leaf)
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if axis is None:
            total = total + jnp.sum(x * x)
        else:
            axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
            total = total + jnp.sum(x * x, axis=axes)
    return total


def average_group_grads(
    group_grads: optax.Updates,
    *,
    group_axis: int | None = 0,
    axis_name: str | Sequence[str] | None = None,
) -> tuple[optax.Updates, jax.Array, jax.Array]:
    r"""The mean of per-group gradients, with the two squared norms of the noise scale.

    For the gradients :math:`g_1, \dots, g_G` of ``G`` equal groups of a batch
    (each the mean over its group's examples), returns

    .. math::

      \bar g = \frac{1}{G}\sum_j g_j, \qquad
      |G_{small}|^2 = \frac{1}{G}\sum_j |g_j|^2, \qquad
      |G_{big}|^2 = |\bar g|^2,

    where :math:`\bar g` is the gradient of the whole batch and :math:`|\cdot|^2`
    sums over every leaf. With ``b`` examples per group, pass the norms to
    ``track_noise_scale(b_small=b, b_big=G·b)`` or to ``noise_scale_estimates``.

    The groups are on axis ``group_axis`` of every leaf (as ``jax.vmap`` stacks
    them), across the devices of ``axis_name`` (inside ``shard_map`` or ``pmap``,
    where each device's gradients are its group, before their all-reduce), or both
    (every device must hold the same number of groups). The mean gradients keep the
    leaves' dtype (averaged in at least float32); the norms are float32 scalars,
    the same on every device.

    Args:
      group_grads: a pytree of gradients, with the groups on ``group_axis``.
      group_axis: the axis of the groups, or ``None`` when each device holds one
        group (then ``axis_name`` is needed).
      axis_name: the name (or names) of the mapped device axes to average over, or
        ``None`` (default) for groups on ``group_axis`` only. Inside
        ``jax.shard_map``, differentiate with respect to device-varying params
        (``jax.lax.pcast(params, axis_name, to="varying")``): the gradient of
        replicated params is already summed over the devices, and the spread
        between devices would read as zero.

    Returns:
      ``(mean_grads, small_sq_norm, big_sq_norm)``.

    Raises:
      ValueError: ``group_axis`` and ``axis_name`` are both ``None`` (one group
        has no spread to measure).

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_warmup as ow
      >>> group_grads = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}  # 2 groups
      >>> grads, small, big = ow.average_group_grads(group_grads)
      >>> grads["w"].tolist(), float(small), float(big)
      ([0.5, 0.5], 1.0, 0.5)

    References:
      McCandlish et al. 2018, An Empirical Model of Large-Batch Training,
      arXiv:1812.06162, appendix A.1.
    """
    if group_axis is None and axis_name is None:
        raise ValueError(
            "average_group_grads needs the groups: give group_axis (the axis the "
            "per-group gradients are stacked on) or axis_name (the devices), got "
            "group_axis=None, axis_name=None"
        )

    def mean(x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if group_axis is not None:
            wide = wide.mean(group_axis)
        if axis_name is not None:
            wide = jax.lax.pmean(wide, axis_name)
        return wide.astype(x.dtype)

    small = _sq_norm(group_grads, group_axis)
    if group_axis is not None:
        small = small.mean()
    if axis_name is not None:
        small = jax.lax.pmean(small, axis_name)
    mean_grads = jax.tree.map(mean, group_grads)
    return mean_grads, small, _sq_norm(mean_grads, None)


def value_and_grad_by_group(
    fun: Callable[..., Any],
    *,
    group_size: int | None = None,
    has_aux: bool = False,
    batch_argnums: int | Sequence[int] | None = None,
    axis_name: str | Sequence[str] | None = None,
) -> Callable[..., tuple[Any, optax.Updates, jax.Array, jax.Array]]:
    """``jax.value_and_grad(fun)`` on each group of a batch, in one pass, averaged.

    ``fun(params, *args)`` is a loss of one group, the mean over its examples;
    the arguments at ``batch_argnums`` (default: all after ``params``) are batches.
    With ``group_size=b`` each of their leaves is split on axis 0 into ``G = N / b``
    consecutive groups of ``b``; with ``group_size=None`` they already have the
    groups on axis 0. ``jax.vmap(jax.value_and_grad(fun, has_aux=has_aux))`` over
    the groups, with ``params`` and the other arguments shared, gives every group's
    gradient, and ``average_group_grads`` their mean (the whole batch's gradient)
    and the two squared norms. The backward pass is the same as the whole batch's;
    the gradients of the parameters are kept per group before their mean.

    A model whose BatchNorm statistics come from groups of ``b`` (ghost BatchNorm,
    or BatchNorm on each group) gives the same loss and gradients as on the whole
    batch; its updated running statistics, returned in ``aux`` per group, average
    to the whole batch's: ``jax.tree.map(lambda s: s.mean(0), aux)``.

    Args:
      fun: ``fun(params, *args) -> loss`` (or ``(loss, aux)`` with ``has_aux``),
        differentiated with respect to ``params``; for ``nnx`` make ``params`` the
        ``nnx.Param`` state and merge the model inside (see the guide).
      group_size: examples per group ``b`` (an integer >= 1 that divides the batch),
        or ``None`` if the batches are already grouped on axis 0.
      has_aux: ``fun`` returns ``(loss, aux)``.
      batch_argnums: the positions in ``args`` (``params`` is 0) of the batches;
        default all but 0.
      axis_name: passed to ``average_group_grads``: the device axes (inside
        ``shard_map``) whose groups are averaged too.

    Returns:
      A function of ``(params, *args)`` that returns ``(value, grads,
      small_sq_norm, big_sq_norm)``: ``value`` is the mean loss over the groups
      (with ``has_aux``, ``(mean loss, aux)`` with ``aux`` stacked per group on
      axis 0), ``grads`` the mean gradient, and the norms as in
      ``average_group_grads``.

    Raises:
      ValueError: ``group_size`` is not an integer >= 1, or does not divide a batch
        (shapes are static, so also under ``jit``); ``batch_argnums`` includes 0.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_warmup as ow
      >>> def loss_fn(w, x, y):
      ...     return 0.5 * jnp.mean((x @ w - y) ** 2)
      >>> x, y = jnp.array([[1.0], [1.0], [2.0], [2.0]]), jnp.zeros(4)
      >>> fn = ow.value_and_grad_by_group(loss_fn, group_size=2)
      >>> loss, grads, small, big = fn(jnp.ones(1), x, y)
      >>> float(loss), grads.tolist(), float(small), float(big)  # groups: 1 and 4
      (1.25, [2.5], 8.5, 6.25)

    References:
      McCandlish et al. 2018, An Empirical Model of Large-Batch Training,
      arXiv:1812.06162, appendix A.1.
    """
    if group_size is not None:
        check_int("group_size", group_size, low=1)
    if batch_argnums is not None:
        batch_argnums = (
            (batch_argnums,) if isinstance(batch_argnums, int) else tuple(batch_argnums)
        )
        if 0 in batch_argnums:
            raise ValueError(
                "batch_argnums must not include 0 (params, shared by the groups), "
                f"got {batch_argnums!r}"
            )
    grad_fn = jax.value_and_grad(fun, has_aux=has_aux)

    def split(x: Any) -> jax.Array:
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] % group_size:
            raise ValueError(
                f"group_size={group_size} must divide the batch on axis 0, got a "
                f"batch of shape {x.shape}"
            )
        return x.reshape(x.shape[0] // group_size, group_size, *x.shape[1:])

    def wrapped(params: Any, *args: Any) -> tuple[Any, Any, jax.Array, jax.Array]:
        mapped = (
            set(range(1, len(args) + 1)) if batch_argnums is None else batch_argnums
        )
        args = tuple(
            jax.tree.map(split, a) if i in mapped and group_size else a
            for i, a in enumerate(args, start=1)
        )
        in_axes = (None, *(0 if i in mapped else None for i in range(1, len(args) + 1)))
        value, group_grads = jax.vmap(grad_fn, in_axes=in_axes)(params, *args)
        grads, small, big = average_group_grads(group_grads, axis_name=axis_name)
        if has_aux:
            loss, aux = value
            value = (_mean_loss(loss, axis_name), aux)
        else:
            value = _mean_loss(value, axis_name)
        return value, grads, small, big

    return wrapped


def _mean_loss(loss: jax.Array, axis_name: Any) -> jax.Array:
    loss = jnp.mean(loss, axis=0)
    return loss if axis_name is None else jax.lax.pmean(loss, axis_name)


class NoiseScaleState(NamedTuple):
    """State of ``track_noise_scale``."""

    count: jax.Array  # type: ignore[assignment]  # int32 scalar: updates so far.
    g2: jax.Array  # float32 scalar: the bias-corrected moving average of |G|².
    trace_sigma: jax.Array  # float32 scalar: the same of tr(Σ).


def track_noise_scale(
    b_small: int | None = None, b_big: int | None = None, *, decay: float = 0.95
) -> optax.GradientTransformationExtraArgs:
    r"""Keeps moving averages of the gradient noise scale's two terms in the state.

    Chain it before or after any optimizer and pass the squared norms of
    ``average_group_grads`` (or ``value_and_grad_by_group``) to ``update``::

      tx = optax.chain(ow.track_noise_scale(32, 1024), ow.goyal_sgd(1024, 50))
      updates, state = tx.update(grads, state, params,
                                 small_sq_norm=small, big_sq_norm=big)
      ow.current_noise_scale(state)  # B_simple

    The updates pass through unchanged. Each update turns the norms into the
    estimates ``g2_t, trace_sigma_t`` of ``noise_scale_estimates(small, big,
    b_small, b_big)`` and moves each average ``a`` as Adam's bias-corrected
    moment does, with ``t`` the count after the update:

    .. math::

      m_t = d\, m_{t-1} + (1 - d)\, x_t, \qquad a_t = m_t / (1 - d^t),

    kept as :math:`a_t = a_{t-1} + \frac{1 - d}{1 - d^t}(x_t - a_{t-1})`, so the
    first read is the first estimate, not a value biased toward 0, and ``decay=0``
    keeps the last estimate only. ``current_noise_scale`` divides the two
    averages (as the paper does, rather than averaging noisy ratios).

    Inside ``ow.accumulate`` it needs no sizes: ``accumulate`` hands it the norms
    and the sizes of each update (``b_small=``, ``b_big=``), which change as the
    batch grows, so ``B_simple`` is tracked along a ramp at no extra cost::

      tx = ow.accumulate(optax.chain(ow.track_noise_scale(), ow.sgd(0.1)),
                         batch_size=ow.rampup_batch_size(64, 64, 10**6, 1024),
                         micro_batch_size=32)

    Sizes passed to ``update`` take precedence over those given here.

    Edge cases: before the first update both averages are 0 and
    ``current_noise_scale`` is NaN. ``update`` without both norms, or without
    sizes (here or passed), raises ``TypeError`` (a tracker fed nothing would
    silently report a stale value); a NaN norm makes the averages NaN from then
    on. An update of one group (``b_big == b_small``, as ``accumulate`` gives for a
    batch of one micro-batch) measures nothing: the state is left as it was
    (under ``jit`` too). Under ``optax.MultiSteps`` it updates once per ``k``
    micro-batches, from the norms passed with the micro-batch that completes the
    update (give that micro-batch's sizes). The count is int32 and saturates
    (``optax.safe_increment``).

    Args:
      b_small: examples per group (an integer >= 1), e.g. the ghost BatchNorm group
        or the per-device batch; or None to take it from each ``update``.
      b_big: examples in the whole batch (an integer > ``b_small``), or None to
        take it from each ``update``.
      decay: ``d``, the decay of the moving averages, in [0, 1); about ``1 / (1 -
        d)`` recent steps weigh in (20 at 0.95).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
      ``small_sq_norm=`` and ``big_sq_norm=`` (scalars), and ``b_small=``,
      ``b_big=`` where not given here; its state is a ``NoiseScaleState``.

    Raises:
      ValueError: bad ``b_small``, ``b_big`` (as in ``noise_scale_estimates``) or
        ``decay``; a norm that is not a scalar. The message names it.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optax_warmup as ow
      >>> tx = optax.chain(ow.track_noise_scale(8, 32, decay=0.5), optax.sgd(0.1))
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> for small, big in [(3.0, 1.5), (2.0, 0.5)]:
      ...     _, state = tx.update({"w": jnp.ones(2)}, state, params,
      ...                          small_sq_norm=small, big_sq_norm=big)
      >>> # estimates (|G|², tr Σ): (1, 16) then (0, 16); weights 1/3 and 2/3
      >>> round(float(ow.current_noise_scale(state)), 3)  # 16 / (1/3)
      48.0

    References:
      McCandlish et al. 2018, An Empirical Model of Large-Batch Training,
      arXiv:1812.06162, appendix A.1; Kingma & Ba 2015, Adam, arXiv:1412.6980
      (bias correction).
    """
    if (b_small is None) != (b_big is None):
        raise ValueError(
            "give both b_small and b_big, or neither (to take them from each "
            f"update), got b_small={b_small!r}, b_big={b_big!r}"
        )
    if b_small is not None:
        _check_sizes(b_small, b_big)
    check_real("decay", decay, low=0.0, high=1.0, high_open=True)

    def init_fn(params: optax.Params) -> NoiseScaleState:
        del params
        zero = jnp.zeros([], jnp.float32)
        return NoiseScaleState(
            count=jnp.zeros([], jnp.int32), g2=zero, trace_sigma=zero
        )

    def update_fn(
        updates,
        state,
        params=None,
        *,
        small_sq_norm: ArrayLike | None = None,
        big_sq_norm: ArrayLike | None = None,
        **extra_args,
    ):
        del params
        small_size: Any = extra_args.get("b_small", b_small)
        big_size: Any = extra_args.get("b_big", b_big)
        missing = [
            name
            for name, value in (
                ("small_sq_norm", small_sq_norm),
                ("big_sq_norm", big_sq_norm),
                ("b_small", small_size),
                ("b_big", big_size),
            )
            if value is None
        ]
        if missing:
            raise TypeError(
                "track_noise_scale's update needs small_sq_norm= and big_sq_norm= "
                "(from ow.average_group_grads or ow.value_and_grad_by_group) and "
                "the sizes (given to track_noise_scale, or b_small= and b_big=, as "
                f"ow.accumulate passes them), missing {', '.join(missing)}"
            )
        small, big = jnp.asarray(small_sq_norm), jnp.asarray(big_sq_norm)
        for name, value in (("small_sq_norm", small), ("big_sq_norm", big)):
            if value.ndim != 0:
                raise ValueError(f"{name} must be a scalar, got shape {value.shape}")
        check_int("b_small", small_size, low=1)
        check_int("b_big", big_size, low=1)
        small_n, big_n = concrete(small_size), concrete(big_size)
        if small_n is not None and big_n is not None and big_n < small_n:
            _check_sizes(small_size, big_size)
        # One group measures no spread: leave the state as it was.
        measured = jnp.asarray(big_size) > jnp.asarray(small_size)
        b_big_safe = jnp.where(measured, big_size, 2 * jnp.asarray(small_size))
        g2, trace_sigma = noise_scale_estimates(small, big, small_size, b_big_safe)
        count = optax.safe_increment(state.count)
        d = jnp.float32(decay)
        weight = (1 - d) / (1 - jnp.power(d, count.astype(jnp.float32)))

        def average(old: jax.Array, new: jax.Array) -> jax.Array:
            moved = old + weight * (new.astype(jnp.float32) - old)
            return jnp.where(measured, moved, old).astype(jnp.float32)

        new_state = NoiseScaleState(
            count=jnp.where(measured, count, state.count),
            g2=average(state.g2, g2),
            trace_sigma=average(state.trace_sigma, trace_sigma),
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def current_noise_scale(opt_state: Any) -> jax.Array:
    r"""``B_simple = tr(Σ) / |G|²`` from the averages of ``track_noise_scale``.

    Looks through any nesting of optax states (``optax.chain``,
    ``optax.MultiSteps``, ``optax.inject_hyperparams``, ``optax.masked``, the
    ``opt_state`` of ``nnx.Optimizer`` with its wrappers, a ``TrainState`` or an
    ``nnx.Optimizer`` itself) for the one ``NoiseScaleState`` and divides its
    averages, ``trace_sigma / g2``. McCandlish et al. predict the critical batch
    size to be about ``B_noise`` (their section 2.3), which ``B_simple`` approximates
    (section 2.2; to an order of magnitude in their tasks): below it a doubled batch
    nearly halves the steps to a target; above it the gain fades. The two averages
    are the state's fields ``g2`` and ``trace_sigma`` (bias-corrected) for whoever
    wants them apart.

    Edge cases: NaN before the first update (0 / 0). The average of ``g2`` can be
    <= 0 when the noise dominates and few steps are averaged; ``B_simple`` is then
    negative or inf (average longer, a larger ``decay``, or use more groups). It
    works under ``jit`` (it returns the traced value).

    Args:
      opt_state: an optax state, or an object with an ``opt_state`` attribute.

    Returns:
      ``B_simple``, a float32 scalar.

    Raises:
      ValueError: the state holds no ``NoiseScaleState`` (chain
        ``ow.track_noise_scale``), or more than one (the message lists where; pass
        the sub-state you mean).

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_warmup as ow
      >>> tx = ow.track_noise_scale(b_small=8, b_big=32)
      >>> state = tx.init({})
      >>> _, state = tx.update({}, state, small_sq_norm=3.0, big_sq_norm=1.5)
      >>> float(ow.current_noise_scale(state))  # tr Σ = 16, |G|² = 1
      16.0

    References:
      McCandlish et al. 2018, An Empirical Model of Large-Batch Training,
      arXiv:1812.06162, sections 2.2 and 2.3 and appendix A.1.
    """
    if not isinstance(opt_state, tuple) and hasattr(opt_state, "opt_state"):
        opt_state = opt_state.opt_state
    leaves, _ = flatten(opt_state, is_leaf=lambda x: isinstance(x, NoiseScaleState))
    found = [(path, leaf) for path, leaf in leaves if isinstance(leaf, NoiseScaleState)]
    if not found:
        raise ValueError(
            "current_noise_scale found no NoiseScaleState in opt_state: chain "
            "ow.track_noise_scale(b_small, b_big) into the optimizer"
        )
    if len(found) > 1:
        where = ", ".join(path or "<root>" for path, _ in found)
        raise ValueError(
            f"current_noise_scale found {len(found)} NoiseScaleStates in opt_state, "
            f"at {where}; pass the sub-state of the one you mean"
        )
    state = found[0][1]
    g2 = jnp.asarray(unwrap(state.g2), jnp.float32)
    trace_sigma = jnp.asarray(unwrap(state.trace_sigma), jnp.float32)
    return trace_sigma / g2
