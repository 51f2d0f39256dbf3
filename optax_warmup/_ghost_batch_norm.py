"""Ghost BatchNorm: batch statistics over groups of the batch, as Goyal et al. had them.

Public as ``optax_warmup.models.GhostBatchNorm``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from optax_warmup._validation import check_int


class GhostBatchNorm(nnx.BatchNorm):
    r"""BatchNorm whose training statistics come from groups of ``group_size`` examples.

    Goyal et al. trained with a minibatch of kn examples spread over k workers and
    computed the BatchNorm statistics on each worker's n = 32 examples, not over the
    whole kn batch (they note that this changes the loss being optimized, and keep n
    fixed when k grows). This layer does the same on one device: in training mode it
    splits the batch (axis 0) into G = N / g consecutive groups of g examples and
    normalizes each group with its own statistics,

    .. math::

      y_{i} = \gamma \frac{x_{i} - \mu_{g(i)}}{\sqrt{\sigma^2_{g(i)} + \epsilon}}
        + \beta,

    where :math:`\mu_g, \sigma^2_g` are the mean and (biased) variance over the
    examples of group g and all non-feature axes, exactly what ``nnx.BatchNorm``
    computes on that group alone. The running statistics move towards the mean over
    groups of the per-group statistics:

    .. math::

      \hat\mu \leftarrow m \hat\mu + (1 - m) \frac{1}{G}\sum_g \mu_g, \qquad
      \hat\sigma^2 \leftarrow m \hat\sigma^2 + (1 - m) \frac{1}{G}\sum_g \sigma^2_g.

    This is the average of the running statistics that G copies of ``nnx.BatchNorm``,
    each applied to one group, would hold; because the update is affine it does not
    matter whether the copies are averaged after every step or only at the end (as a
    data-parallel job that keeps per-worker statistics and averages them at the end
    would). So "BatchNorm applied to each group separately" holds for the outputs and
    the running statistics alike. Note that :math:`\frac{1}{G}\sum_g \sigma^2_g` is the
    within-group variance: smaller than the whole batch's variance by the variance of
    the group means.

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
    ):
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
        return self._ghost_train(jnp.asarray(x))

    def _ghost_train(self, x: jax.Array) -> jax.Array:
        g = self.group_size
        batch = x.shape[0] if x.ndim else 0
        feature_axis = self.axis % x.ndim if x.ndim else 0
        if x.ndim < 2 or feature_axis == 0:
            raise ValueError(
                "GhostBatchNorm needs the batch on axis 0 and the features on another "
                f"axis, got input shape {x.shape} and axis={self.axis}"
            )
        if batch % g:
            raise ValueError(
                f"the batch size {batch} is not a multiple of group_size={g}: "
                "ghost BatchNorm needs whole groups"
            )

        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        x, _, _, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype
        )
        # (N, ...) -> (G, g, ...): the statistics reduce over everything but the
        # group axis 0 and the feature axis.
        groups = x.reshape((batch // g, g, *x.shape[1:]))
        feature = feature_axis + 1
        axes = tuple(i for i in range(1, groups.ndim) if i != feature)

        stat_dtype = jnp.promote_types(
            self.dtype if self.dtype is not None else groups.dtype, jnp.float32
        )
        xs = groups.astype(stat_dtype)
        mean = xs.mean(axes, keepdims=True)
        if self.use_fast_variance:
            var = jnp.maximum(0.0, (xs * xs).mean(axes, keepdims=True) - mean * mean)
        else:
            var = jnp.square(xs - mean).mean(axes, keepdims=True)

        m = self.momentum
        group_mean = mean.mean(0).reshape(self.mean.shape)
        group_var = var.mean(0).reshape(self.var.shape)
        self.mean[...] = jax.lax.stop_gradient(
            m * self.mean[...] + (1 - m) * group_mean
        )
        self.var[...] = jax.lax.stop_gradient(m * self.var[...] + (1 - m) * group_var)

        feature_shape = [1] * groups.ndim
        feature_shape[feature] = groups.shape[feature]
        mul = jax.lax.rsqrt(var + self.epsilon)
        if scale is not None:
            mul = mul * scale.reshape(feature_shape)
        y = (groups - mean) * mul
        if bias is not None:
            y = y + bias.reshape(feature_shape)
        args = [a for a in (x, scale, bias) if a is not None]
        out_dtype = self.dtype if self.dtype is not None else jnp.result_type(*args)
        return y.reshape(x.shape).astype(out_dtype)
