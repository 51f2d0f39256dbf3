"""Ghost BatchNorm: batch statistics over groups of the batch, as Goyal et al. had them.

Public as ``optax_warmup.models.GhostBatchNorm``. The training path is a thin shell
over the pure helpers below (as in ``flax.nnx.BatchNorm``): split the batch into
groups, compute each group's statistics, normalize each group with its own, and
move the running statistics towards the groups' mean statistics.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from optax_warmup._validation import check_int


def _split_groups(x: jax.Array, group_size: int) -> jax.Array:
    """``(N, ...) -> (N // group_size, group_size, ...)``: consecutive groups."""
    return x.reshape((x.shape[0] // group_size, group_size, *x.shape[1:]))


def _group_stats(
    groups: jax.Array,
    feature_axis: int,
    *,
    dtype: DTypeLike | None,
    use_fast_variance: bool,
) -> tuple[jax.Array, jax.Array]:
    r"""The mean and biased variance of each group, in at least float32.

    For groups of shape ``(G, g, ...)`` the statistics reduce over every axis but the
    group axis 0 and ``feature_axis`` (an axis of ``groups``, not of the input), and
    keep the reduced axes as size 1: :math:`\mu_j = \overline{x}_j`,
    :math:`\sigma^2_j = \overline{(x - \mu_j)^2}_j` over group j, or
    :math:`\max(0, \overline{x^2}_j - \mu_j^2)` with ``use_fast_variance``. They are
    computed in ``promote_types(dtype or groups.dtype, float32)``.
    """
    axes = tuple(i for i in range(1, groups.ndim) if i != feature_axis)
    stat_dtype = jnp.promote_types(
        dtype if dtype is not None else groups.dtype, jnp.float32
    )
    xs = groups.astype(stat_dtype)
    mean = xs.mean(axes, keepdims=True)
    if use_fast_variance:
        var = jnp.maximum(0.0, (xs * xs).mean(axes, keepdims=True) - mean * mean)
    else:
        var = jnp.square(xs - mean).mean(axes, keepdims=True)
    return mean, var


def _normalize(
    groups: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    feature_axis: int,
    epsilon: float,
) -> jax.Array:
    r""":math:`\gamma (x - \mu_j) / \sqrt{\sigma^2_j + \epsilon} + \beta` per group j.

    ``mean`` and ``var`` come from ``_group_stats`` (broadcastable to ``groups``);
    ``scale`` (γ) and ``bias`` (β) have one entry per feature of ``feature_axis``,
    and ``None`` leaves that step out.
    """
    feature_shape = [1] * groups.ndim
    feature_shape[feature_axis] = groups.shape[feature_axis]
    mul = jax.lax.rsqrt(var + epsilon)
    if scale is not None:
        mul = mul * scale.reshape(feature_shape)
    y = (groups - mean) * mul
    if bias is not None:
        y = y + bias.reshape(feature_shape)
    return y


def _running_average(
    running: jax.Array, group_stat: jax.Array, momentum: float
) -> jax.Array:
    r""":math:`m \cdot \text{running} + (1 - m) \frac{1}{G}\sum_j s_j`.

    ``group_stat`` holds one statistic :math:`s_j` per group on axis 0 (the output
    of ``_group_stats``); the result has the shape of ``running``.
    """
    pooled = group_stat.mean(0).reshape(running.shape)
    return momentum * running + (1 - momentum) * pooled


class GhostBatchNorm(nnx.BatchNorm):
    r"""BatchNorm whose training statistics come from groups of ``group_size`` examples.

    Goyal et al. computed the BatchNorm statistics of their kn-example minibatch on
    each worker's n = 32 examples. In training mode this layer splits the batch
    (axis 0) into G = N / g consecutive groups of g examples and normalizes each
    group with its own mean and biased variance (over the group's examples and all
    non-feature axes), exactly as ``nnx.BatchNorm`` would on that group alone:

    .. math::

      y_{i} = \gamma \frac{x_{i} - \mu_{g(i)}}{\sqrt{\sigma^2_{g(i)} + \epsilon}}
        + \beta, \qquad
      \hat\mu \leftarrow m \hat\mu + (1 - m) \frac{1}{G}\sum_g \mu_g, \qquad
      \hat\sigma^2 \leftarrow m \hat\sigma^2 + (1 - m) \frac{1}{G}\sum_g \sigma^2_g.

    The running statistics are the average of those that G copies of
    ``nnx.BatchNorm``, one per group, would hold (the guide "Initializers and
    models" derives this, and why the average of the group variances is smaller
    than the whole batch's variance).

    Edge cases: ``group_size=None`` is ordinary ``nnx.BatchNorm``; ``group_size``
    equal to the batch size gives the same values as ordinary BatchNorm; evaluation
    mode (``model.eval()`` or ``use_running_average=True``) uses the running
    statistics and ignores ``group_size``. A batch that ``group_size`` does not divide
    raises ``ValueError`` naming both sizes (shapes are static, so this also happens
    under ``jit``).

    Args:
      num_features: the number of features (channels) of the input.
      group_size: the number of examples per group, an integer >= 1, or ``None``
        (default) for ordinary BatchNorm over the whole batch.
      **kwargs: the keyword arguments of ``nnx.BatchNorm`` (``momentum``,
        ``epsilon``, ``axis``, ``dtype``, ``scale_init``, ``rngs``, ...) with their
        flax defaults (momentum 0.99). ``axis`` must not be the batch axis 0, and
        ``axis_name`` cannot be combined with ``group_size`` (each group is normalized
        on its own; there is nothing to synchronize across devices).

    Returns:
      The layer; calling it returns an array of the input's shape.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from optax_warmup.models import GhostBatchNorm
      >>> x = jax.random.normal(jax.random.key(0), (8, 5, 3))  # (batch, length, C)
      >>> ghost = GhostBatchNorm(3, group_size=4, momentum=0.9, rngs=nnx.Rngs(0))
      >>> y = ghost(x)
      >>> bn = nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
      >>> bool(jnp.allclose(y[:4], bn(x[:4]), atol=1e-5))
      True
      >>> ghost.eval()  # running statistics from now on

    References:
      Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
      arXiv:1706.02677 (Sec. 2.3, "Batch Normalization with large minibatches").
      Hoffer et al. 2017, Train longer, generalize better, arXiv:1705.08741 ("Ghost
      Batch Normalization").
    """

    def __init__(
        self, num_features: int, *, group_size: int | None = None, **kwargs: Any
    ) -> None:
        if group_size is not None:
            check_int("group_size", group_size, low=1)
            group_size = int(group_size)
            if kwargs.get("axis_name") is not None:
                raise ValueError(
                    "axis_name cannot be combined with group_size: ghost BatchNorm "
                    f"normalizes each group on its own, got axis_name="
                    f"{kwargs['axis_name']!r} and group_size={group_size}"
                )
        super().__init__(num_features, **kwargs)
        self.group_size = group_size

    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes ``x`` with per-group (training) or running (eval) statistics.

        Args:
          x: the input, batch on axis 0 and features on ``axis``.
          use_running_average: overrides the layer's mode when given (as in
            ``nnx.BatchNorm``).
          mask: as in ``nnx.BatchNorm``; not supported together with ``group_size``
            in training mode (``ValueError``).

        Returns:
          The normalized input, of the input's shape.
        """
        running = (
            self.use_running_average
            if use_running_average is None
            else use_running_average
        )
        if self.group_size is None or running is None or running:
            return super().__call__(x, use_running_average, mask=mask)
        if mask is not None:
            raise ValueError("mask is not supported together with group_size")
        return self._ghost_train(jnp.asarray(x), self.group_size)

    def _ghost_train(self, x: jax.Array, group_size: int) -> jax.Array:
        batch = x.shape[0] if x.ndim else 0
        feature_axis = self.axis % x.ndim if x.ndim else 0
        if x.ndim < 2 or feature_axis == 0:
            raise ValueError(
                "GhostBatchNorm needs the batch on axis 0 and the features on another "
                f"axis, got input shape {x.shape} and axis={self.axis}"
            )
        if batch % group_size:
            raise ValueError(
                f"the batch size {batch} is not a multiple of "
                f"group_size={group_size}: ghost BatchNorm needs whole groups"
            )

        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        x, _, _, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype
        )
        groups = _split_groups(x, group_size)
        feature = feature_axis + 1  # the feature axis of ``groups``
        mean, var = _group_stats(
            groups,
            feature,
            dtype=self.dtype,
            use_fast_variance=self.use_fast_variance,
        )
        stop = jax.lax.stop_gradient
        self.mean[...] = stop(_running_average(self.mean[...], mean, self.momentum))
        self.var[...] = stop(_running_average(self.var[...], var, self.momentum))

        y = _normalize(groups, mean, var, scale, bias, feature, self.epsilon)
        args = [a for a in (x, scale, bias) if a is not None]
        out_dtype = self.dtype if self.dtype is not None else jnp.result_type(*args)
        return y.reshape(x.shape).astype(out_dtype)
