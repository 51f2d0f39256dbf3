"""Initializers of Goyal et al. 2017 for ResNets, as ``jax.nn.initializers``.

Each factory returns a ``jax.nn.initializers.Initializer``, a function
``(key, shape, dtype, out_sharding=None) -> Array``, so it plugs into
``nnx.Conv(kernel_init=...)``, ``nnx.Linear(kernel_init=...)``,
``nnx.BatchNorm(scale_init=...)`` and their ``flax.linen`` twins. The dtype asked
for is the dtype returned (bfloat16 in, bfloat16 out); normal samples are drawn in
float32 (or wider) and rounded to it, because a normal drawn directly in bfloat16 is
truncated near 2.9σ and biased.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.nn.initializers import Initializer
from jax.sharding import NamedSharding, PartitionSpec
from jax.typing import ArrayLike, DTypeLike

from optax_warmup._validation import check_real

# The ``out_sharding`` of ``jax.nn.initializers.Initializer``.
OutSharding = NamedSharding | PartitionSpec | None


def _normal(
    key: jax.Array,
    shape: Sequence[int],
    dtype: DTypeLike | None,
    stddev: ArrayLike,
    out_sharding: OutSharding,
) -> jax.Array:
    """N(0, stddev²) drawn in at least float32, then rounded to ``dtype``.

    ``jax.random.normal`` drawn directly in bfloat16 comes from a bfloat16 uniform:
    it is cut off near 2.9σ and its mean is off by about -0.01σ. Drawing in float32
    and rounding keeps the tails and an unbiased mean. ``dtype=None`` is float32.
    """
    dtype = jnp.float32 if dtype is None else dtype
    wide = jnp.promote_types(dtype, jnp.float32)
    sample = jax.random.normal(key, shape, wide, out_sharding=out_sharding)
    return (sample * jnp.asarray(stddev, wide)).astype(dtype)


def fan_out(shape: Sequence[int]) -> int:
    r"""The fan-out of a flax convolution kernel: spatial size × output channels.

    .. math::

      \text{fan\_out} = k_1 \cdots k_d \cdot c_\text{out}

    for a kernel of shape ``(k_1, ..., k_d, c_in, c_out)``; ``c_in`` (per group for
    a grouped conv) does not enter. The one definition that ``he_conv_init`` draws
    with and ``init_report`` checks against.

    Args:
      shape: the kernel's shape, with at least the two channel dimensions.

    Returns:
      The fan-out, a Python ``int``.

    Example:
      >>> from optax_warmup._initializers import fan_out
      >>> fan_out((3, 3, 64, 128))  # 3 * 3 * 128
      1152
    """
    return math.prod(shape[:-2]) * shape[-1]


def he_conv_init() -> Initializer:
    r"""He (MSRA) normal initializer for convolution kernels, fan-out mode.

    Samples an untruncated normal with the variance that keeps the backward signal's
    scale through a ReLU network:

    .. math::

      w \sim \mathcal{N}\!\left(0, \frac{2}{\text{fan\_out}}\right), \qquad
      \text{fan\_out} = k_1 \cdots k_d \cdot c_\text{out}

    for a flax kernel of shape ``(k_1, ..., k_d, c_in, c_out)`` with ``d`` = 1, 2 or 3
    spatial dimensions (``c_in`` is the input channels per group for a grouped conv;
    it does not enter ``fan_out``). This is the ``MSRAFill`` of Caffe2 that Goyal et al.
    used, and PyTorch's ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` as in
    torchvision's ResNets.

    It is **not** ``jax.nn.initializers.he_normal``: that one uses ``fan_in``
    (``k_1 \cdots k_d \cdot c_in``) and a *truncated* normal rescaled to the same
    variance. The two agree only when ``c_in == c_out`` and the tails do not matter.

    Returns:
      An initializer ``init(key, shape, dtype=jnp.float32, out_sharding=None) ->
      jax.Array`` (``dtype=None`` is float32). It raises
      ``ValueError`` naming ``shape`` when the shape is not that of a 1-D, 2-D or 3-D
      convolution kernel (3 to 5 dimensions) or has a zero-sized dimension.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import optax_warmup as ow
      >>> init = ow.he_conv_init()
      >>> w = init(jax.random.key(0), (3, 3, 64, 128), jnp.float32)
      >>> target = (2 / (3 * 3 * 128)) ** 0.5
      >>> bool(abs(w.std() / target - 1) < 0.03)
      True
      >>> conv = nnx.Conv(64, 128, (3, 3), use_bias=False, kernel_init=init,
      ...                 rngs=nnx.Rngs(0))

    References:
      He et al. 2015, Delving Deep into Rectifiers, arXiv:1502.01852 (Sec. 2.2, the
      backward case).
      Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
      arXiv:1706.02677 (Sec. 5.1).
    """

    def init(
        key: jax.Array,
        shape: Sequence[int],
        dtype: DTypeLike | None = jnp.float32,
        out_sharding: OutSharding = None,
    ) -> jax.Array:
        shape = tuple(int(d) for d in shape)
        if not 3 <= len(shape) <= 5 or min(shape) < 1:
            raise ValueError(
                "shape must be a 1-D, 2-D or 3-D convolution kernel "
                "(*spatial, in_features, out_features) with positive sizes, "
                f"got shape={shape}"
            )
        stddev = math.sqrt(2.0 / fan_out(shape))
        return _normal(key, shape, dtype, stddev, out_sharding)

    return init


def gaussian_fc_init(stddev: ArrayLike = 0.01) -> Initializer:
    r"""Gaussian initializer for the final fully-connected layer.

    .. math::

      w \sim \mathcal{N}(0, \sigma^2), \qquad \sigma = \text{stddev} = 0.01

    Goyal et al. (Sec. 5.1) draw the weights of the final fully-connected layer
    from a zero-mean Gaussian whose *standard deviation* is 0.01. The seed notes of
    this project write :math:`\sigma^2 = 0.01` (that is :math:`\sigma = 0.1`);
    that is a slip, and this initializer follows the paper: ``stddev`` is the
    standard deviation, not the variance. Use ``jax.nn.initializers.zeros`` for
    the bias.

    Args:
      stddev: the standard deviation of the normal, a positive finite number
        (default 0.01). Zero, negative, infinite or NaN values raise ``ValueError``
        naming ``stddev`` and the value.

    Returns:
      An initializer ``init(key, shape, dtype=jnp.float32, out_sharding=None) ->
      jax.Array`` (``dtype=None`` is float32) of any shape (flax's ``Linear``
      kernel is ``(in_features, out_features)``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import optax_warmup as ow
      >>> w = ow.gaussian_fc_init()(jax.random.key(0), (512, 1000), jnp.bfloat16)
      >>> w.dtype
      dtype(bfloat16)
      >>> bool(abs(w.astype(jnp.float32).std() / 0.01 - 1) < 0.03)
      True
      >>> fc = nnx.Linear(512, 10, kernel_init=ow.gaussian_fc_init(0.01),
      ...                 bias_init=jax.nn.initializers.zeros, rngs=nnx.Rngs(0))

    References:
      Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
      arXiv:1706.02677 (Sec. 5.1).
    """
    check_real("stddev", stddev, low=0.0, low_open=True)

    def init(
        key: jax.Array,
        shape: Sequence[int],
        dtype: DTypeLike | None = jnp.float32,
        out_sharding: OutSharding = None,
    ) -> jax.Array:
        return _normal(key, shape, dtype, stddev, out_sharding)

    return init


def zero_gamma_init() -> Initializer:
    r"""Zero initializer for the last BatchNorm scale (γ) of each residual branch.

    .. math::

      \gamma = 0 \quad\Longrightarrow\quad
      \mathrm{block}(x) = \mathrm{relu}(\mathrm{shortcut}(x) + \gamma\hat{y} + \beta)
      = \mathrm{relu}(\mathrm{shortcut}(x))

    With β = 0 as well, the residual branch contributes exactly zero at the start, so
    every residual block begins as (a ReLU of) its shortcut and the network behaves
    like a shallower one early in training. Every other BatchNorm keeps γ = 1.

    Returns:
      An initializer ``init(key, shape, dtype=jnp.float32, out_sharding=None) ->
      jax.Array`` that returns exact zeros of ``shape`` and ``dtype`` (``None`` is
      float32).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import optax_warmup as ow
      >>> ow.zero_gamma_init()(jax.random.key(0), (4,), jnp.float32)
      Array([0., 0., 0., 0.], dtype=float32)
      >>> bn = nnx.BatchNorm(4, scale_init=ow.zero_gamma_init(), rngs=nnx.Rngs(0))

    References:
      Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
      arXiv:1706.02677 (Sec. 5.1: γ = 0 in each residual block's last BN).
      He et al. 2019, Bag of Tricks for Image Classification with Convolutional Neural
      Networks, arXiv:1812.01187 (Sec. 3.1, "zero γ").
    """

    def init(
        key: jax.Array,
        shape: Sequence[int],
        dtype: DTypeLike | None = jnp.float32,
        out_sharding: OutSharding = None,
    ) -> jax.Array:
        del key
        dtype = jnp.float32 if dtype is None else dtype
        return jnp.zeros(shape, dtype, out_sharding=out_sharding)

    return init
