"""Label smoothing, and a label-smoothed cross-entropy that never builds the one-hot.

Label smoothing (Szegedy et al. 2016; Müller et al. 2019) trains against the target
``(1 - α)·y + α/K`` instead of the one-hot ``y``. Written the obvious way, with
``jax.nn.one_hot`` and ``optax.softmax_cross_entropy``, it materialises several
``(…, K)`` arrays per step; at a 128k vocabulary that is gigabytes.
:func:`smoothed_cross_entropy` computes the same loss from integer labels with row
reductions and a gather only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from optax_warmup._validation import is_traced


def _check_alpha(alpha: ArrayLike, batch_shape: tuple[int, ...], batch: str) -> None:
    """Raises unless ``alpha`` broadcasts to ``batch_shape`` and lies in [0, 1].

    A traced ``alpha`` (under ``jit``, ``vmap`` or ``grad``) has no value to check; only
    its shape and dtype are checked.
    """
    dtype = jnp.result_type(alpha)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"alpha must be a real number or array, got dtype {dtype}.")
    shape = jnp.shape(alpha)
    try:
        broadcast = np.broadcast_shapes(shape, batch_shape)
    except ValueError:
        broadcast = None
    if broadcast != tuple(batch_shape):
        raise ValueError(
            f"alpha must broadcast to {batch}={tuple(batch_shape)}, "
            f"got alpha.shape={shape}."
        )
    if is_traced(alpha):
        return  # A traced value cannot be checked; documented in the public functions.
    value = np.asarray(alpha, dtype=np.float64)
    bad = ~((value >= 0.0) & (value <= 1.0))  # NaN fails both comparisons.
    if bad.any():
        shown = value.item() if value.ndim == 0 else value[bad][:5].tolist()
        raise ValueError(f"alpha must be in [0, 1], got alpha={shown}.")


def smooth_labels(labels: ArrayLike, alpha: ArrayLike) -> jax.Array:
    r"""Mixes target distributions with the uniform distribution over classes.

    For targets :math:`y` with :math:`K` classes on the last axis,

    .. math::
        \tilde y = (1 - \alpha)\, y + \frac{\alpha}{K}.

    Works on any number of leading axes (``(K,)``, ``(B, K)``, ``(B, T, K)``) and
    under ``jax.jit`` and ``jax.vmap``; unlike the seed's version it never modifies
    its input. The arithmetic is done in at least float32 and the result is cast
    back, so the dtype of ``labels`` is kept (bf16 in, bf16 out).

    Args:
        labels: Floating targets (one-hot or probabilities), classes on the last axis.
        alpha: Smoothing factor in [0, 1]: a Python float or an array that broadcasts
            to ``labels.shape[:-1]`` (one factor per example). ``alpha=0`` returns the
            labels unchanged, ``alpha=1`` the uniform distribution. A concrete value
            outside [0, 1], or NaN, raises; a traced ``alpha`` (under ``jit``,
            ``vmap`` or ``grad``) cannot be checked, and is used as given.

    Returns:
        The smoothed targets, with the shape and dtype of ``labels``.

    Raises:
        TypeError: If ``labels`` is not floating (integer class indices: one-hot them
            with ``jax.nn.one_hot``, or pass them to :func:`smoothed_cross_entropy`).
        ValueError: If ``labels`` is a scalar, or ``alpha`` is outside [0, 1], NaN, or
            does not broadcast to ``labels.shape[:-1]``.

    Example:
        >>> import jax.numpy as jnp
        >>> import optax_warmup as ow
        >>> print(ow.smooth_labels(jnp.array([[0.0, 1.0, 0.0, 0.0]]), 0.2))
        [[0.05 0.85 0.05 0.05]]

    References:
        Szegedy et al. 2016, Rethinking the Inception Architecture for Computer
        Vision, arXiv:1512.00567.

        Müller, Kornblith, Hinton 2019, When Does Label Smoothing Help?,
        arXiv:1906.02629.
    """
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        raise TypeError(
            f"labels must be floating (one-hot or probabilities), got dtype "
            f"{labels.dtype}. One-hot integer class indices with "
            "jax.nn.one_hot(labels, num_classes), or pass them to "
            "smoothed_cross_entropy, which takes integer labels directly."
        )
    if labels.ndim == 0:
        raise ValueError(
            "labels must have a class axis (the last one), got a scalar "
            f"labels.shape={labels.shape}."
        )
    _check_alpha(alpha, labels.shape[:-1], "labels.shape[:-1]")
    return _smooth_labels(labels, alpha)


@jax.jit
def _smooth_labels(labels: jax.Array, alpha: ArrayLike) -> jax.Array:
    # Jitted so that an eager call is one compiled kernel, not a dispatch per op.
    compute = jnp.promote_types(labels.dtype, jnp.float32)
    a = jnp.asarray(alpha, compute)[..., None]
    smoothed = labels.astype(compute) * (1 - a) + a / labels.shape[-1]
    return smoothed.astype(labels.dtype)


def smoothed_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    alpha: ArrayLike = 0.1,
    *,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Label-smoothed softmax cross-entropy, from integer labels without a one-hot.

    For logits :math:`z` over :math:`K` classes and an integer label :math:`y`, the
    cross-entropy against the smoothed target :math:`(1-\alpha)\,e_y + \alpha/K` is

    .. math::
        \ell = \operatorname{logsumexp}(z) - (1 - \alpha)\, z_y
               - \frac{\alpha}{K} \sum_{k} z_k,

    which equals ``optax.softmax_cross_entropy(logits, smooth_labels(
    jax.nn.one_hot(labels, K), alpha))``. It is computed with row reductions and a
    gather, and its derivative (a ``jax.custom_jvp``: softmax minus the smoothed
    target, the one-hot being an iota comparison) in one elementwise pass, so for
    float32 logits neither the forward nor the backward pass holds a temporary of
    shape ``(…, K)``: the gradient is the only one. (bf16 or float16 logits add one
    float32 copy of the logits.) It works under ``jit``, ``vmap``, ``grad``,
    ``jvp`` (so Hessians too), and on inputs sharded over a device mesh.

    For probability targets :math:`t` (same shape as ``logits``) the target is
    ``smooth_labels(t, alpha)``, and by autodiff
    :math:`\ell = (1-\alpha)(\sum_k t_k\,\operatorname{logsumexp}(z) - \sum_k t_k z_k)
    + \alpha(\operatorname{logsumexp}(z) - \frac{1}{K}\sum_k z_k)`, with
    :math:`0 \cdot (-\infty) = 0`; this path may hold ``(…, K)`` temporaries.

    Edge cases:

    * ``alpha=0`` is the plain cross-entropy (a ``-inf`` logit elsewhere in the row
      does not turn it into NaN); ``alpha=1`` is the cross-entropy to the uniform
      distribution, which is ``inf`` if any logit is ``-inf``.
    * Integer labels outside ``[0, K)`` (including negative ones such as ``-100``)
      give a NaN loss, never a plausible finite number; the gradient of such a row
      is zero. Mask padding with ``where`` instead.
    * Logits up to ±1e4 in float32 are fine. With integer labels the forward
      log-sum-exp is shifted by the row mean (which the loss needs anyway, so it
      reads the logits no more often than the unsmoothed loss does), and by the
      row maximum when that would overflow; elsewhere by the row maximum.
    * bf16 and float16 logits are reduced in float32 and the loss is float32; the
      gradient has the dtype of ``logits``.

    Args:
        logits: Floating logits, classes on the last axis; any leading axes.
        labels: Integer class indices of shape ``logits.shape[:-1]``, or floating
            target distributions of shape ``logits.shape``.
        alpha: Smoothing factor in [0, 1]: a Python float or an array that broadcasts
            to ``logits.shape[:-1]``. A concrete value outside [0, 1], or NaN, raises;
            a traced ``alpha`` cannot be checked and is used as given.
        where: Optional bool mask of shape ``logits.shape[:-1]``. Where it is False the
            loss is 0 and the gradient is exactly 0, whatever the logits (NaN or inf)
            and labels (out of range) hold there. Averaging is left to the caller,
            e.g. ``loss.sum() / where.sum()``.

    Returns:
        The per-example loss, shape ``logits.shape[:-1]``, float32 (or float64 for
        float64 logits).

    Raises:
        TypeError: If ``logits`` is not floating, ``labels`` is neither integer nor
            floating, or ``where`` is not bool.
        ValueError: If ``logits`` is a scalar or has no classes, the shape of
            ``labels`` or ``where`` does not match, or ``alpha`` is outside [0, 1],
            NaN, or does not broadcast to ``logits.shape[:-1]``.

    Example:
        >>> import jax.numpy as jnp
        >>> import optax_warmup as ow
        >>> logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
        >>> labels = jnp.array([0, 2])
        >>> print(ow.smoothed_cross_entropy(logits, labels, alpha=0.1).round(4))
        [0.3365 0.3187]
        >>> print(ow.smoothed_cross_entropy(logits, labels, alpha=0.0).round(4))
        [0.1698 0.152 ]

    References:
        Szegedy et al. 2016, Rethinking the Inception Architecture for Computer
        Vision, arXiv:1512.00567.

        Müller, Kornblith, Hinton 2019, When Does Label Smoothing Help?,
        arXiv:1906.02629.
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"logits must be floating, got dtype {logits.dtype}.")
    if logits.ndim == 0 or logits.shape[-1] == 0:
        raise ValueError(
            "logits must have a non-empty class axis (the last one), got "
            f"logits.shape={logits.shape}."
        )
    batch_shape = logits.shape[:-1]
    integer_labels = jnp.issubdtype(labels.dtype, jnp.integer)
    if integer_labels:
        if labels.shape != batch_shape:
            raise ValueError(
                "integer labels must have shape logits.shape[:-1]="
                f"{batch_shape}, got labels.shape={labels.shape}."
            )
    elif jnp.issubdtype(labels.dtype, jnp.floating):
        if labels.shape != logits.shape:
            raise ValueError(
                "probability labels must have the shape of logits "
                f"{logits.shape}, got labels.shape={labels.shape}."
            )
    else:
        raise TypeError(
            "labels must be integer class indices or floating probabilities, got "
            f"dtype {labels.dtype}."
        )
    _check_alpha(alpha, batch_shape, "logits.shape[:-1]")
    if where is not None:
        where = jnp.asarray(where)
        if where.dtype != jnp.bool_:
            raise TypeError(
                f"where must be a bool mask, got dtype {where.dtype}; "
                "use mask.astype(bool), or weight the returned loss instead."
            )
        if where.shape != batch_shape:
            raise ValueError(
                f"where must have shape logits.shape[:-1]={batch_shape}, got "
                f"where.shape={where.shape}."
            )
    return _smoothed_cross_entropy(logits, labels, alpha, where)


@jax.jit
def _smoothed_cross_entropy(
    logits: jax.Array, labels: jax.Array, alpha: ArrayLike, where: jax.Array | None
) -> jax.Array:
    # Jitted so that an eager call is one compiled kernel, not a dispatch per op.
    compute = jnp.promote_types(logits.dtype, jnp.float32)
    z = logits.astype(compute)
    a = jnp.asarray(alpha, compute)
    mask = jnp.ones(logits.shape[:-1], jnp.bool_) if where is None else where
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.dtype.itemsize < 4:  # so that K and the class iota fit the dtype
            labels = labels.astype(jnp.int32)
        return _integer_label_loss(z, labels, a, mask)
    return _probability_loss(z, labels.astype(compute), a, mask)


# XLA:CPU (jax 0.10) computes exp(z - max) about four times slower per element on
# rows longer than 32768 than on shorter rows; the same elements laid out as a 2-D
# (rows · pieces, K / pieces) array run at full speed (measured at K = 128256, for
# optax's integer-label loss too). The reshape is free (a bitcast). The choice is
# made when the program is lowered (``jax.lax.platform_dependent``), not when it is
# traced, so a function traced on one backend and lowered or exported for another
# (``jax.export`` with several ``platforms``, ahead-of-time compilation for a GPU
# from a CPU host) gets each platform's own path; other backends get the plain rows.
_CPU_ROW_LIMIT = 32768


def _row_pieces(num_classes: int) -> int:
    """The fewest equal pieces of at most _CPU_ROW_LIMIT classes a CPU row cuts into."""
    if num_classes <= _CPU_ROW_LIMIT:
        return 1
    for pieces in range(-(-num_classes // _CPU_ROW_LIMIT), num_classes // 1024 + 1):
        if num_classes % pieces == 0:
            return pieces
    return 1  # no divisor leaves pieces of at least 1024 classes: do not cut


def _row_max(z: jax.Array) -> jax.Array:
    """The row maximum as a shift for exp: 0 where it is not finite."""
    row_max = jax.lax.stop_gradient(jnp.max(z, axis=-1))
    return jnp.where(jnp.isfinite(row_max), row_max, 0)


def _sum_exp_plain(z: jax.Array, row_max: jax.Array) -> jax.Array:
    """Σ_k exp(z_k - row_max) over the last axis."""
    return jnp.sum(jnp.exp(z - row_max[..., None]), axis=-1)


def _sum_exp_in_pieces(z: jax.Array, row_max: jax.Array, pieces: int) -> jax.Array:
    """Σ_k exp(z_k - row_max), each row summed as ``pieces`` equal pieces."""
    num_classes = z.shape[-1]
    flat_max = row_max.reshape(-1, 1)
    shift = jnp.broadcast_to(flat_max, (flat_max.shape[0], pieces)).reshape(-1, 1)
    exp_pieces = jnp.exp(z.reshape(-1, num_classes // pieces) - shift)
    sums = jnp.sum(exp_pieces, axis=-1).reshape(*z.shape[:-1], pieces)
    return jnp.sum(sums, axis=-1)


def _sum_exp_shifted(z: jax.Array, row_max: jax.Array) -> jax.Array:
    """Σ_k exp(z_k - row_max): in row pieces on CPU, plain rows elsewhere."""
    pieces = _row_pieces(z.shape[-1])
    if pieces == 1:
        return _sum_exp_plain(z, row_max)
    return jax.lax.platform_dependent(
        z,
        row_max,
        cpu=functools.partial(_sum_exp_in_pieces, pieces=pieces),
        default=_sum_exp_plain,
    )


def _logsumexp(z: jax.Array) -> jax.Array:
    """logsumexp over the last axis, shifted by the row maximum."""
    row_max = _row_max(z)
    return jnp.log(_sum_exp_shifted(z, row_max)) + row_max


def _logsumexp_about_mean(
    z: jax.Array, row_mean: jax.Array, check: jax.Array
) -> jax.Array:
    """logsumexp over the last axis, shifted by the row mean where that is safe.

    The loss needs the row mean anyway; shifting exp by it instead of by the row
    maximum saves the pass over the logits that finds the maximum, so the forward
    pass reads the logits as often as the unsmoothed loss does. The largest term
    exp(max - mean) is at least 1, so the sum cannot underflow; it overflows to inf
    when max - mean exceeds about 88 - log K (float32), and is NaN for NaN or inf
    logits. If any row where ``check`` holds has a sum that is not finite, every row
    is recomputed with the maximum as the shift (a ``lax.cond``, so only one branch
    runs; under ``vmap`` both run and the right one is selected).
    """
    shift = jax.lax.stop_gradient(row_mean)
    sum_exp = _sum_exp_shifted(z, shift)
    safe = jnp.all(jnp.isfinite(sum_exp) | ~check)
    return jax.lax.cond(
        safe,
        lambda: jnp.log(sum_exp) + shift,
        lambda: _logsumexp(z),
    )


def _mix(target_term: jax.Array, uniform_term: jax.Array, a: jax.Array) -> jax.Array:
    """(1 - a)·target + a·uniform, exact at a = 0 and a = 1 even if a term is inf."""
    return jnp.where(a == 1, 0, (1 - a) * target_term) + jnp.where(
        a == 0, 0, a * uniform_term
    )


def _integer_label_terms(
    z: jax.Array,
    labels: jax.Array,
    a: jax.Array,
    mask: jax.Array,
    lse: jax.Array,
    row_mean: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The loss and the row statistics its derivative needs, given logsumexp(z).

    Returns ``(loss, target_term, uniform_term, keep)`` with target_term =
    lse - z_y, uniform_term = lse - mean(z), and keep = the rows that are unmasked
    and have a label in [0, K).
    """
    num_classes = z.shape[-1]
    valid = (labels >= 0) & (labels < num_classes)
    safe_labels = jnp.where(valid, labels, 0)
    # A gather and a row sum of z itself: XLA fuses each into one pass over the
    # logits, without a (…, K) temporary.
    z_y = jnp.take_along_axis(z, safe_labels[..., None], axis=-1, mode="clip")[..., 0]
    target_term = lse - z_y
    uniform_term = lse - row_mean
    loss = jnp.where(valid, _mix(target_term, uniform_term, a), jnp.nan)
    loss = jnp.where(mask, loss, 0)
    return loss, target_term, uniform_term, valid & mask


@jax.custom_jvp
def _integer_label_loss(
    z: jax.Array, labels: jax.Array, a: jax.Array, mask: jax.Array
) -> jax.Array:
    """The loss from integer labels: NaN for labels outside [0, K), 0 where masked."""
    row_mean = jnp.mean(z, axis=-1)
    lse = _logsumexp_about_mean(z, row_mean, mask)
    return _integer_label_terms(z, labels, a, mask, lse, row_mean)[0]


@_integer_label_loss.defjvp
def _integer_label_loss_jvp(primals, tangents):
    """d loss = Σ_k (softmax(z)_k - smoothed target_k)·dz_k + (uniform - target)·dα.

    Written by hand so that the backward pass is one elementwise pass: the one-hot
    is an iota comparison inside that pass, never stored, and exp(z - max) is
    computed once (XLA keeps it in the gradient's own buffer, as it does for
    optax's integer-label loss). Masked rows and rows with out-of-range labels get
    an exact zero derivative even when their logits are NaN or inf.
    """
    z, labels, a, mask = primals
    dz, _, da, _ = tangents
    row_max = _row_max(z)
    # Not cut into row pieces: under grad XLA keeps exp_shifted in the gradient's
    # buffer and computes it in a plain elementwise pass, which is fast at any K.
    exp_shifted = jnp.exp(z - row_max[..., None])
    sum_exp = jnp.sum(exp_shifted, axis=-1)
    lse = jnp.log(sum_exp) + row_max
    loss, target_term, uniform_term, keep = _integer_label_terms(
        z, labels, a, mask, lse, jnp.mean(z, axis=-1)
    )
    a_k = a[..., None]
    classes = jax.lax.broadcasted_iota(labels.dtype, z.shape, z.ndim - 1)
    one_hot = classes == labels[..., None]
    softmax = exp_shifted * (1 / sum_exp)[..., None]
    coef = softmax - a_k / z.shape[-1] - jnp.where(one_hot, 1 - a_k, 0)
    coef = jnp.where(keep[..., None], coef, 0)
    d_loss = jnp.sum(coef * dz, axis=-1)
    d_loss = d_loss + jnp.where(keep, uniform_term - target_term, 0) * da
    return loss, d_loss


def _probability_loss(
    z: jax.Array, t: jax.Array, a: jax.Array, mask: jax.Array
) -> jax.Array:
    """The loss from probability targets ``t`` (same shape as ``z``); 0 where masked."""
    # Masked rows are replaced before any arithmetic, so that no NaN or inf there
    # reaches the backward pass (where 0 · NaN would be NaN).
    z = jnp.where(mask[..., None], z, 0)
    t = jnp.where(mask[..., None], t, 0)
    lse = _logsumexp(z)
    # 0·(-inf) counts as 0, as in the definition of cross-entropy.
    t_dot_z = jnp.sum(jnp.where(t == 0, 0, t * z), axis=-1)
    target_term = jnp.sum(t, axis=-1) * lse - t_dot_z
    uniform_term = lse - jnp.mean(z, axis=-1)
    return jnp.where(mask, _mix(target_term, uniform_term, a), 0)
