"""ResNets in flax.nnx, initialized the way Goyal et al. 2017 initialized theirs.

Convolutions use ``he_conv_init`` (He normal, fan-out, untruncated) and no bias; every
BatchNorm has γ = 1 and β = 0, except the last BatchNorm of each residual branch,
which starts at γ = 0 (``zero_init_residual=True``) so that each residual block
starts as ``relu(shortcut(x))``; the final fully-connected layer uses
``gaussian_fc_init(0.01)`` and a zero bias. BatchNorm uses momentum 0.9 (running =
0.9 · running + 0.1 · batch, PyTorch's ``momentum=0.1``) and epsilon 1e-5, and may
compute its statistics over groups of the batch (``batch_norm_group_size``, see
``GhostBatchNorm``). Training and evaluation modes are nnx's: ``model.train()``
and ``model.eval()``.

Inputs are channels-last: ``(N, H, W, C)`` for ``spatial_dims=2`` (images),
``(N, L, C)`` for ``spatial_dims=1`` (sequences), ``(N, D, H, W, C)`` for 3.

References:
  He et al. 2016, Deep Residual Learning for Image Recognition, arXiv:1512.03385.
  Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
  arXiv:1706.02677.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from optax_warmup._ghost_batch_norm import GhostBatchNorm
from optax_warmup._init_report import init_report
from optax_warmup._initializers import gaussian_fc_init, he_conv_init, zero_gamma_init
from optax_warmup._validation import check_int

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "GhostBatchNorm",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNet101",
    "SmallResNet1D",
    "init_report",
]

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


class _Layers:
    """Builds the convs and BatchNorms of one network with its shared settings."""

    def __init__(
        self,
        spatial_dims: int,
        batch_norm_group_size: int | None,
        dtype: DTypeLike | None,
        param_dtype: DTypeLike,
        rngs: nnx.Rngs,
    ):
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
        if batch_norm_group_size is not None:
            check_int("batch_norm_group_size", batch_norm_group_size, low=1)
        self.spatial_dims = spatial_dims
        self.group_size = batch_norm_group_size
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.rngs = rngs

    def conv(self, cin: int, cout: int, kernel: int, stride: int = 1) -> nnx.Conv:
        # Symmetric padding k // 2 as in torchvision (flax's "SAME" pads stride-2
        # convs asymmetrically).
        pad = kernel // 2
        return nnx.Conv(
            cin,
            cout,
            (kernel,) * self.spatial_dims,
            strides=stride,
            padding=[(pad, pad)] * self.spatial_dims,
            use_bias=False,
            kernel_init=he_conv_init(),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            rngs=self.rngs,
        )

    def norm(self, features: int, zero_gamma: bool = False) -> GhostBatchNorm:
        return GhostBatchNorm(
            features,
            group_size=self.group_size,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            scale_init=zero_gamma_init() if zero_gamma else nnx.initializers.ones,
            bias_init=nnx.initializers.zeros,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            rngs=self.rngs,
        )


class _Projection(nnx.Module):
    """Projection shortcut: 1×1 conv with stride, then BatchNorm with γ = 1."""

    def __init__(self, layers: _Layers, cin: int, cout: int, stride: int):
        self.conv = layers.conv(cin, cout, 1, stride)
        self.bn = layers.norm(cout)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


class _ResidualBlock(nnx.Module):
    """Shared ``__call__``: ``relu(branch(x) + shortcut(x))``."""

    expansion = 1
    shortcut: _Projection | None

    def _make_shortcut(self, layers: _Layers, cin: int, cout: int, stride: int):
        needs_projection = stride != 1 or cin != cout
        self.shortcut = (
            _Projection(layers, cin, cout, stride) if needs_projection else None
        )

    def branch(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x if self.shortcut is None else self.shortcut(x)
        return jax.nn.relu(self.branch(x) + residual)


class BasicBlock(_ResidualBlock):
    """Two 3×3 convolutions with a residual connection (ResNet-18/34).

    ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, expansion 1.

    Args:
      in_features: input channels.
      features: the block's width; it outputs ``features * expansion`` channels.
      strides: stride of the block (on its 3×3 conv); a stride other than 1 or a
        change of channels makes ``shortcut`` a projection (1×1 conv + BatchNorm,
        γ = 1); otherwise ``shortcut`` is ``None`` (identity).
      spatial_dims: 1 (``(N, L, C)``), 2 (``(N, H, W, C)``, default) or 3.
      zero_init_residual: if True (default), the last BatchNorm of the residual
        branch starts at γ = 0, so the block starts as ``relu(shortcut(x))``.
      batch_norm_group_size: ``None`` for ordinary BatchNorm, or the number of
        examples per group of ``GhostBatchNorm``.
      dtype: computation dtype (default: from the inputs and parameters).
      param_dtype: parameter dtype (default float32).
      rngs: the ``nnx.Rngs`` for the initializers.
    """

    expansion = 1

    def __init__(
        self,
        in_features: int,
        features: int,
        *,
        strides: int = 1,
        spatial_dims: int = 2,
        zero_init_residual: bool = True,
        batch_norm_group_size: int | None = None,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        layers = _Layers(spatial_dims, batch_norm_group_size, dtype, param_dtype, rngs)
        self.conv1 = layers.conv(in_features, features, 3, strides)
        self.bn1 = layers.norm(features)
        self.conv2 = layers.conv(features, features, 3)
        self.bn2 = layers.norm(features, zero_gamma=zero_init_residual)
        self._make_shortcut(layers, in_features, features, strides)

    def branch(self, x: jax.Array) -> jax.Array:
        """The residual branch alone (without shortcut and final ReLU)."""
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(y))


class Bottleneck(_ResidualBlock):
    """1×1, 3×3, 1×1 convolutions with a residual connection (ResNet-50/101).

    ``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x))``,
    expansion 4. The stride sits on the 3×3 conv (torchvision's "ResNet v1.5", which
    He et al. 2019 call ResNet-B), not on the first 1×1 as in He et al. 2016. The
    arguments are those of ``BasicBlock``; the block outputs
    ``4 * features`` channels.
    """

    expansion = 4

    def __init__(
        self,
        in_features: int,
        features: int,
        *,
        strides: int = 1,
        spatial_dims: int = 2,
        zero_init_residual: bool = True,
        batch_norm_group_size: int | None = None,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        layers = _Layers(spatial_dims, batch_norm_group_size, dtype, param_dtype, rngs)
        out = features * self.expansion
        self.conv1 = layers.conv(in_features, features, 1)
        self.bn1 = layers.norm(features)
        self.conv2 = layers.conv(features, features, 3, strides)
        self.bn2 = layers.norm(features)
        self.conv3 = layers.conv(features, out, 1)
        self.bn3 = layers.norm(out, zero_gamma=zero_init_residual)
        self._make_shortcut(layers, in_features, out, strides)

    def branch(self, x: jax.Array) -> jax.Array:
        """The residual branch alone (without shortcut and final ReLU)."""
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        return self.bn3(self.conv3(y))


class ResNet(nnx.Module):
    r"""A ResNet of residual stages, for images (2-D) or sequences (1-D).

    Stem → stages → global average pool → fully-connected layer:

    - stem: 7×7 conv with stride 2, BatchNorm, ReLU and 3×3 max-pool with stride 2
      (He et al. 2016, ImageNet); with ``small_input=True``, a 3×3 conv with stride 1,
      BatchNorm and ReLU only (for 32×32 images or 40-sample sequences, where the
      ImageNet stem would throw away three quarters of the input);
    - stage i has ``stage_sizes[i]`` blocks of width ``widths[i]``; the first block
      of every stage but the first has stride 2;
    - the head averages over the spatial axes and applies a ``nnx.Linear``.

    The network outputs logits of shape ``(N, num_classes)``. With 1000 classes and
    3 input channels the parameter counts equal torchvision's (convs without bias,
    BatchNorm with scale and bias; running statistics are ``nnx.BatchStat``, not
    parameters): ResNet-18 11,689,512, ResNet-34 21,797,672, ResNet-50 25,557,032,
    ResNet-101 44,549,160.

    Args:
      stage_sizes: the number of blocks in each stage, e.g. ``(2, 2, 2, 2)``.
      block: ``BasicBlock`` (default), ``Bottleneck``, or a class with their
        constructor signature, an ``expansion`` attribute and a ``shortcut``
        attribute (for ``init_report``).
      widths: the width of each stage (as long as ``stage_sizes``); the stem has
        ``widths[0]`` channels. Default ``(64, 128, 256, 512)``.
      num_classes: the number of outputs (default 1000).
      in_features: input channels (default 3).
      spatial_dims: 2 for ``(N, H, W, C)`` (default), 1 for ``(N, L, C)``, 3 for
        ``(N, D, H, W, C)``.
      small_input: use the small stem described above (default False).
      zero_init_residual: γ = 0 for the last BatchNorm of each residual branch
        (default True); False gives γ = 1 everywhere.
      batch_norm_group_size: ``None`` (default) for ordinary BatchNorm, or g to
        compute training statistics over groups of g examples (``GhostBatchNorm``);
        the batch must then be a multiple of g.
      dtype: the computation dtype (default: inferred; e.g. ``jnp.bfloat16``).
      param_dtype: the parameter dtype (default float32).
      rngs: the ``nnx.Rngs`` used by the initializers.

    Returns:
      The module. Calling it on an array of the documented layout returns logits;
      a wrong number of input dimensions raises ``ValueError``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import optax_warmup as ow
      >>> model = ow.models.ResNet((1, 1), widths=(8, 8), num_classes=10,
      ...                          in_features=1, spatial_dims=1, small_input=True,
      ...                          rngs=nnx.Rngs(0))
      >>> ow.models.init_report(model)  # follows Goyal's initialization rules
      []
      >>> x = jnp.ones((4, 40, 1))  # (batch, length, channels)
      >>> model(x).shape  # training mode: batch statistics
      (4, 10)
      >>> model.eval()  # running statistics from now on
      >>> big = nnx.eval_shape(lambda: ow.models.ResNet50(rngs=nnx.Rngs(0)))
      >>> sum(p.size for p in jax.tree.leaves(nnx.state(big, nnx.Param)))
      25557032

    References:
      He et al. 2016, Deep Residual Learning for Image Recognition, arXiv:1512.03385.
      Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
      arXiv:1706.02677 (Sec. 5.1).
    """

    def __init__(
        self,
        stage_sizes: Sequence[int],
        *,
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock,
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 1000,
        in_features: int = 3,
        spatial_dims: int = 2,
        small_input: bool = False,
        zero_init_residual: bool = True,
        batch_norm_group_size: int | None = None,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        stage_sizes, widths = tuple(stage_sizes), tuple(widths)
        if not stage_sizes:
            raise ValueError(f"stage_sizes must not be empty, got {stage_sizes!r}")
        for name, values in (("stage_sizes", stage_sizes), ("widths", widths)):
            for v in values:
                check_int(name, v, low=1)
        if len(widths) != len(stage_sizes):
            raise ValueError(
                f"widths must have one entry per stage, got widths={widths} for "
                f"stage_sizes={stage_sizes}"
            )
        check_int("num_classes", num_classes, low=1)
        check_int("in_features", in_features, low=1)
        layers = _Layers(spatial_dims, batch_norm_group_size, dtype, param_dtype, rngs)
        self.spatial_dims = spatial_dims
        self.small_input = small_input

        kernel, stride = (3, 1) if small_input else (7, 2)
        self.stem_conv = layers.conv(in_features, widths[0], kernel, stride)
        self.stem_bn = layers.norm(widths[0])

        settings: dict[str, Any] = dict(
            spatial_dims=spatial_dims,
            zero_init_residual=zero_init_residual,
            batch_norm_group_size=batch_norm_group_size,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        stages, cin = [], widths[0]
        for i, (size, width) in enumerate(zip(stage_sizes, widths, strict=True)):
            blocks = []
            for j in range(size):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(cin, width, strides=stride, **settings))
                cin = width * block.expansion
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)

        self.fc = nnx.Linear(
            cin,
            num_classes,
            kernel_init=gaussian_fc_init(0.01),
            bias_init=nnx.initializers.zeros,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns the logits ``(N, num_classes)`` for a channels-last batch ``x``."""
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected an input of {self.spatial_dims + 2} dimensions (batch, "
                f"{self.spatial_dims} spatial, channels), got shape {x.shape}"
            )
        x = jax.nn.relu(self.stem_bn(self.stem_conv(x)))
        if not self.small_input:
            window = (3,) * self.spatial_dims
            x = nnx.max_pool(
                x,
                window,
                strides=(2,) * self.spatial_dims,
                padding=((1, 1),) * len(window),
            )
        for stage in self.stages:
            for blk in stage:
                x = blk(x)
        x = x.mean(axis=tuple(range(1, 1 + self.spatial_dims)))
        return self.fc(x)


def _constructor(stage_sizes: tuple[int, ...], block: type, name: str, paper: str):
    def build(*, num_classes: int = 1000, rngs: nnx.Rngs, **kwargs: Any) -> ResNet:
        return ResNet(
            stage_sizes, block=block, num_classes=num_classes, rngs=rngs, **kwargs
        )

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"""{name}: ``ResNet({stage_sizes}, block={block.__name__})``.

    {paper}

    Args:
      num_classes: the number of outputs (default 1000).
      rngs: the ``nnx.Rngs`` used by the initializers.
      **kwargs: any other keyword argument of ``ResNet`` (``in_features``,
        ``spatial_dims``, ``small_input``, ``zero_init_residual``,
        ``batch_norm_group_size``, ``dtype``, ``param_dtype``, ``widths``).

    Returns:
      The ``ResNet``.
    """
    return build


ResNet18 = _constructor(
    (2, 2, 2, 2), BasicBlock, "ResNet18", "11,689,512 parameters at 1000 classes."
)
ResNet34 = _constructor(
    (3, 4, 6, 3), BasicBlock, "ResNet34", "21,797,672 parameters at 1000 classes."
)
ResNet50 = _constructor(
    (3, 4, 6, 3), Bottleneck, "ResNet50", "25,557,032 parameters at 1000 classes."
)
ResNet101 = _constructor(
    (3, 4, 23, 3), Bottleneck, "ResNet101", "44,549,160 parameters at 1000 classes."
)


def SmallResNet1D(
    num_classes: int = 10,
    *,
    in_features: int = 1,
    stage_sizes: Sequence[int] = (1, 1, 1),
    widths: Sequence[int] = (16, 32, 64),
    rngs: nnx.Rngs,
    **kwargs: Any,
) -> ResNet:
    """A small 1-D ResNet for short sequences such as MNIST-1D (40 samples, 1 channel).

    ``ResNet(stage_sizes, widths=widths, block=BasicBlock, spatial_dims=1,
    small_input=True)``: a 3-tap stem, one BasicBlock per stage by default, lengths
    40 → 20 → 10, about 28.5k parameters at the defaults. Fast enough to train on a
    CPU.

    Args:
      num_classes: the number of outputs (default 10).
      in_features: input channels (default 1).
      stage_sizes: blocks per stage (default ``(1, 1, 1)``).
      widths: width of each stage (default ``(16, 32, 64)``).
      rngs: the ``nnx.Rngs`` used by the initializers.
      **kwargs: any other keyword argument of ``ResNet`` (``zero_init_residual``,
        ``batch_norm_group_size``, ``dtype``, ...).

    Returns:
      The ``ResNet``; it takes inputs of shape ``(N, L, in_features)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import optax_warmup as ow
      >>> model = ow.models.SmallResNet1D(widths=(8, 8, 8), batch_norm_group_size=4,
      ...                                 rngs=nnx.Rngs(0))
      >>> model(jnp.ones((8, 40, 1))).shape  # two groups of 4 in training mode
      (8, 10)
    """
    return ResNet(
        stage_sizes,
        block=BasicBlock,
        widths=widths,
        num_classes=num_classes,
        in_features=in_features,
        spatial_dims=1,
        small_input=True,
        rngs=rngs,
        **kwargs,
    )
