"""The layers and residual blocks of ``optax_warmup.models``' ResNets.

``Layers`` holds the settings that every conv and BatchNorm of one network shares
and builds them; the blocks take one ``Layers`` instead of repeating its settings,
and a user's own block class can use it the same way. Public as
``optax_warmup.models.Layers``, ``Projection``, ``ResidualBlock``, ``BasicBlock``
and ``Bottleneck``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from optax_warmup._ghost_batch_norm import GhostBatchNorm
from optax_warmup._initializers import gaussian_fc_init, he_conv_init, zero_gamma_init
from optax_warmup._validation import check_int, check_real


@dataclasses.dataclass(frozen=True)
class Layers:
    r"""Builds the convolutions, BatchNorms and classifier of one ResNet.

    One immutable (and hashable) set of settings, made once by ``ResNet`` and handed
    to every block, which asks it for its layers; like the ``conv`` and ``norm``
    partials of flax's ImageNet example. The layers follow Goyal et al.'s rules:

    - ``conv``: He normal in fan-out mode (``he_conv_init``), no bias, symmetric
      padding ``kernel_size // 2`` as in torchvision (flax's ``"SAME"`` pads a
      stride-2 conv asymmetrically);
    - ``norm``: ``GhostBatchNorm`` with γ = 1 and β = 0, except that the last
      BatchNorm of a residual branch starts at γ = 0 when ``zero_init_residual``;
      running statistics move as
      :math:`\hat\mu \leftarrow m\hat\mu + (1 - m)\mu_\text{batch}` (PyTorch's
      ``momentum`` is :math:`1 - m`);
    - ``shortcut``: ``None`` (identity) or a ``Projection``;
    - ``linear``: the classifier, :math:`\mathcal{N}(0, 0.01^2)` kernel
      (``gaussian_fc_init``) and zero bias.

    Every method takes the ``nnx.Rngs`` of the module being built (the builder
    holds no state of its own), so the layers draw their keys in the order they
    are made.

    Args:
      spatial_dims: 1 (``(N, L, C)``), 2 (``(N, H, W, C)``, default) or 3
        (``(N, D, H, W, C)``).
      batch_norm_group_size: ``None`` (default) for ordinary BatchNorm, or the
        number of examples per group of ``GhostBatchNorm``.
      batch_norm_momentum: :math:`m` above, in [0, 1] (default 0.9).
      batch_norm_epsilon: added to the variance, >= 0 (default 1e-5).
      zero_init_residual: whether ``norm(..., last_of_branch=True)`` starts at
        γ = 0 (default True).
      dtype: the computation dtype (default: inferred from inputs and parameters).
      param_dtype: the parameter dtype (default float32).

    Raises:
      ValueError: naming the argument, for a ``spatial_dims`` other than 1, 2 or 3,
        a ``batch_norm_group_size`` that is not a positive integer, a momentum
        outside [0, 1] or a negative epsilon.

    Example:
      A block of one's own, built from the same layers (an identity shortcut
      when the shape does not change, else a projection):

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import optax_warmup as ow
      >>> class Wide(ow.models.ResidualBlock):
      ...     expansion = 1
      ...     def __init__(self, in_features, features, *, strides=1,
      ...                  layers=ow.models.Layers(), rngs):
      ...         self.conv = layers.conv(in_features, features, 5, strides,
      ...                                 rngs=rngs)
      ...         self.bn = layers.norm(features, last_of_branch=True, rngs=rngs)
      ...         self.shortcut = layers.shortcut(in_features, features, strides,
      ...                                         rngs=rngs)
      ...     def branch(self, x):
      ...         return self.bn(self.conv(x))
      >>> model = ow.models.ResNet((1, 1), block=Wide, widths=(8, 8),
      ...                          num_classes=3, in_features=1, spatial_dims=1,
      ...                          small_input=True, rngs=nnx.Rngs(0))
      >>> ow.models.init_report(model)
      []
      >>> model(jnp.ones((4, 12, 1))).shape
      (4, 3)
    """

    spatial_dims: int = 2
    batch_norm_group_size: int | None = None
    batch_norm_momentum: float = 0.9
    batch_norm_epsilon: float = 1e-5
    zero_init_residual: bool = True
    dtype: DTypeLike | None = None
    param_dtype: DTypeLike = jnp.float32

    def __post_init__(self) -> None:
        if self.spatial_dims not in (1, 2, 3):
            raise ValueError(
                f"spatial_dims must be 1, 2 or 3, got {self.spatial_dims!r}"
            )
        if self.batch_norm_group_size is not None:
            check_int("batch_norm_group_size", self.batch_norm_group_size, low=1)
        check_real("batch_norm_momentum", self.batch_norm_momentum, low=0.0, high=1.0)
        check_real("batch_norm_epsilon", self.batch_norm_epsilon, low=0.0)

    def conv(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        strides: int = 1,
        *,
        rngs: nnx.Rngs,
    ) -> nnx.Conv:
        """A ``kernel_size``-wide convolution, He fan-out init, no bias.

        Padding is ``kernel_size // 2`` on both sides of every spatial axis.
        """
        pad = kernel_size // 2
        return nnx.Conv(
            in_features,
            out_features,
            (kernel_size,) * self.spatial_dims,
            strides=strides,
            padding=[(pad, pad)] * self.spatial_dims,
            use_bias=False,
            kernel_init=he_conv_init(),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            rngs=rngs,
        )

    def norm(
        self, features: int, *, last_of_branch: bool = False, rngs: nnx.Rngs
    ) -> GhostBatchNorm:
        """A BatchNorm with the network's momentum, epsilon and group size.

        γ = 1 and β = 0; γ = 0 instead when ``last_of_branch`` (the last BatchNorm
        of a residual branch) and ``zero_init_residual``.
        """
        zero_gamma = last_of_branch and self.zero_init_residual
        return GhostBatchNorm(
            features,
            group_size=self.batch_norm_group_size,
            momentum=self.batch_norm_momentum,
            epsilon=self.batch_norm_epsilon,
            scale_init=zero_gamma_init() if zero_gamma else nnx.initializers.ones,
            bias_init=nnx.initializers.zeros,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            rngs=rngs,
        )

    def shortcut(
        self, in_features: int, out_features: int, strides: int = 1, *, rngs: nnx.Rngs
    ) -> Projection | None:
        """``None`` (identity) when the shape is kept, else a ``Projection``.

        The shape is kept when ``strides == 1`` and ``in_features ==
        out_features``.
        """
        if strides == 1 and in_features == out_features:
            return None
        return Projection(in_features, out_features, strides, layers=self, rngs=rngs)

    def linear(
        self, in_features: int, out_features: int, *, rngs: nnx.Rngs
    ) -> nnx.Linear:
        """The classifier: kernel N(0, 0.01²), zero bias."""
        return nnx.Linear(
            in_features,
            out_features,
            kernel_init=gaussian_fc_init(0.01),
            bias_init=nnx.initializers.zeros,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            rngs=rngs,
        )


class Projection(nnx.Module):
    """Projection shortcut: a 1×1 conv with stride, then BatchNorm with γ = 1.

    Args:
      in_features: input channels.
      out_features: output channels.
      strides: the stride of the 1×1 conv.
      layers: the network's ``Layers``.
      rngs: the ``nnx.Rngs`` for the initializers.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        strides: int = 1,
        *,
        layers: Layers,
        rngs: nnx.Rngs,
    ) -> None:
        self.conv = layers.conv(in_features, out_features, 1, strides, rngs=rngs)
        self.bn = layers.norm(out_features, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``bn(conv(x))``."""
        return self.bn(self.conv(x))


class ResidualBlock(nnx.Module):
    """Base of a residual block: ``relu(branch(x) + shortcut(x))``.

    A subclass sets ``expansion`` (its output has ``features * expansion``
    channels), builds its branch and ``self.shortcut`` (``None`` for identity,
    e.g. from ``Layers.shortcut``) in ``__init__``, and defines ``branch``.
    ``ResNet`` constructs each block as ``block(in_features, features,
    strides=..., layers=..., rngs=...)``, the signature below; ``init_report``
    finds blocks by their ``shortcut`` attribute. ``Layers`` shows a block of
    one's own.

    Args:
      in_features: input channels.
      features: the block's width.
      strides: the block's stride.
      layers: the network's ``Layers``.
      rngs: the ``nnx.Rngs`` for the initializers.
    """

    expansion: ClassVar[int] = 1
    shortcut: nnx.Module | None

    def __init__(
        self,
        in_features: int,
        features: int,
        *,
        strides: int = 1,
        layers: Layers = Layers(),
        rngs: nnx.Rngs,
    ) -> None:
        """The constructor every block has; a subclass builds its layers here."""
        raise NotImplementedError(
            f"{type(self).__name__} must define __init__ and build its branch and "
            "shortcut there"
        )

    def branch(self, x: jax.Array) -> jax.Array:
        """The residual branch alone (without shortcut and final ReLU)."""
        raise NotImplementedError

    def __call__(self, x: jax.Array) -> jax.Array:
        """``relu(branch(x) + x)``, or with ``shortcut(x)`` in place of ``x``."""
        residual = x if self.shortcut is None else self.shortcut(x)
        return jax.nn.relu(self.branch(x) + residual)


class BasicBlock(ResidualBlock):
    """Two 3×3 convolutions with a residual connection (ResNet-18/34).

    ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, expansion 1; ``bn2``
    starts at γ = 0 when ``layers.zero_init_residual``.

    Args:
      in_features: input channels.
      features: the block's width; it outputs ``features * expansion`` channels.
      strides: stride of the block (on its first 3×3 conv); a stride other than 1
        or a change of channels makes ``shortcut`` a ``Projection``; otherwise
        ``shortcut`` is ``None`` (identity).
      layers: the network's ``Layers`` (default ``Layers()``: 2-D, ordinary
        BatchNorm with momentum 0.9 and epsilon 1e-5, zero-γ).
      rngs: the ``nnx.Rngs`` for the initializers.
    """

    expansion = 1

    def __init__(
        self,
        in_features: int,
        features: int,
        *,
        strides: int = 1,
        layers: Layers = Layers(),
        rngs: nnx.Rngs,
    ) -> None:
        self.conv1 = layers.conv(in_features, features, 3, strides, rngs=rngs)
        self.bn1 = layers.norm(features, rngs=rngs)
        self.conv2 = layers.conv(features, features, 3, rngs=rngs)
        self.bn2 = layers.norm(features, last_of_branch=True, rngs=rngs)
        self.shortcut = layers.shortcut(in_features, features, strides, rngs=rngs)

    def branch(self, x: jax.Array) -> jax.Array:
        """The residual branch alone (without shortcut and final ReLU)."""
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(y))


class Bottleneck(ResidualBlock):
    """1×1, 3×3, 1×1 convolutions with a residual connection (ResNet-50/101).

    ``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x))``,
    expansion 4; ``bn3`` starts at γ = 0 when ``layers.zero_init_residual``. The
    stride sits on the 3×3 conv (torchvision's "ResNet v1.5", which He et al. 2019
    call ResNet-B), not on the first 1×1 as in He et al. 2016. The arguments are
    those of ``BasicBlock``; the block outputs ``4 * features`` channels.
    """

    expansion = 4

    def __init__(
        self,
        in_features: int,
        features: int,
        *,
        strides: int = 1,
        layers: Layers = Layers(),
        rngs: nnx.Rngs,
    ) -> None:
        out = features * self.expansion
        self.conv1 = layers.conv(in_features, features, 1, rngs=rngs)
        self.bn1 = layers.norm(features, rngs=rngs)
        self.conv2 = layers.conv(features, features, 3, strides, rngs=rngs)
        self.bn2 = layers.norm(features, rngs=rngs)
        self.conv3 = layers.conv(features, out, 1, rngs=rngs)
        self.bn3 = layers.norm(out, last_of_branch=True, rngs=rngs)
        self.shortcut = layers.shortcut(in_features, out, strides, rngs=rngs)

    def branch(self, x: jax.Array) -> jax.Array:
        """The residual branch alone (without shortcut and final ReLU)."""
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        return self.bn3(self.conv3(y))
