"""ResNets in flax.nnx, initialized the way Goyal et al. 2017 initialized theirs.

Convolutions use ``he_conv_init`` (He normal, fan-out, untruncated) and no bias; every
BatchNorm has γ = 1 and β = 0, except the last BatchNorm of each residual branch,
which starts at γ = 0 (``zero_init_residual=True``) so that each residual block
starts as ``relu(shortcut(x))``; the final fully-connected layer uses
``gaussian_fc_init(0.01)`` and a zero bias. BatchNorm uses momentum 0.9 (running =
0.9 · running + 0.1 · batch, PyTorch's ``momentum=0.1``) and epsilon 1e-5 by default
(``batch_norm_momentum``, ``batch_norm_epsilon``), and may compute its statistics
over groups of the batch (``batch_norm_group_size``, see ``GhostBatchNorm``). One
``Layers`` object carries these settings to every block; a block of one's own
subclasses ``ResidualBlock`` and asks ``Layers`` for its layers. Training and
evaluation modes are nnx's: ``model.train()`` and ``model.eval()``.

Inputs are channels-last: ``(N, H, W, C)`` for ``spatial_dims=2`` (images),
``(N, L, C)`` for ``spatial_dims=1`` (sequences), ``(N, D, H, W, C)`` for 3.

References:
  He et al. 2016, Deep Residual Learning for Image Recognition, arXiv:1512.03385.
  Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
  arXiv:1706.02677.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from optax_warmup._ghost_batch_norm import GhostBatchNorm
from optax_warmup._init_report import init_report
from optax_warmup._resnet_blocks import (
    BasicBlock,
    Bottleneck,
    Layers,
    Projection,
    ResidualBlock,
)
from optax_warmup._validation import check_int

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "GhostBatchNorm",
    "Layers",
    "Projection",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNet101",
    "ResidualBlock",
    "SmallResNet1D",
    "init_report",
]


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
      block: ``BasicBlock`` (default), ``Bottleneck``, or a ``ResidualBlock`` of
        one's own (see ``Layers``): a class called as ``block(in_features,
        features, strides=..., layers=..., rngs=...)``, with an ``expansion``
        attribute and a ``shortcut`` attribute (for ``init_report``).
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
      batch_norm_momentum: every BatchNorm's running statistics move as
        ``m * running + (1 - m) * batch`` with ``m = batch_norm_momentum``
        (default 0.9, PyTorch's ``momentum=0.1``); in [0, 1].
      batch_norm_epsilon: added to the variance in every BatchNorm (default
        1e-5); >= 0.
      dtype: the computation dtype (default: inferred; e.g. ``jnp.bfloat16``).
      param_dtype: the parameter dtype (default float32).
      rngs: the ``nnx.Rngs`` used by the initializers.

    Returns:
      The module. Calling it on an array of the documented layout returns logits;
      a wrong number of input dimensions raises ``ValueError``.

    Raises:
      ValueError: naming the argument, for empty ``stage_sizes``, non-positive
        sizes, widths, ``num_classes`` or ``in_features``, ``widths`` of another
        length than ``stage_sizes``, and the settings that ``Layers`` refuses.

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
        block: type[ResidualBlock] = BasicBlock,
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 1000,
        in_features: int = 3,
        spatial_dims: int = 2,
        small_input: bool = False,
        zero_init_residual: bool = True,
        batch_norm_group_size: int | None = None,
        batch_norm_momentum: float = 0.9,
        batch_norm_epsilon: float = 1e-5,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
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
        layers = Layers(
            spatial_dims=spatial_dims,
            batch_norm_group_size=batch_norm_group_size,
            batch_norm_momentum=batch_norm_momentum,
            batch_norm_epsilon=batch_norm_epsilon,
            zero_init_residual=zero_init_residual,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        self.spatial_dims = spatial_dims
        self.small_input = small_input

        kernel, stride = (3, 1) if small_input else (7, 2)
        self.stem_conv = layers.conv(in_features, widths[0], kernel, stride, rngs=rngs)
        self.stem_bn = layers.norm(widths[0], rngs=rngs)

        stages, cin = [], widths[0]
        for i, (size, width) in enumerate(zip(stage_sizes, widths, strict=True)):
            blocks = []
            for j in range(size):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(
                    block(cin, width, strides=stride, layers=layers, rngs=rngs)
                )
                cin = width * block.expansion
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)

        self.fc = layers.linear(cin, num_classes, rngs=rngs)

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


# The parameter counts of torchvision's ResNets (1000 classes, 3 input channels),
# which ours equal (tests/test_models.py counts them); and the convolutions on the
# residual branch of each block, which give a variant's depth.
_TORCHVISION_PARAMETERS = {
    18: 11_689_512,
    34: 21_797_672,
    50: 25_557_032,
    101: 44_549_160,
}
_CONVS_PER_BLOCK = {BasicBlock: 2, Bottleneck: 3}


class _Variant(partial):  # type: ignore[type-arg]
    """A ``functools.partial`` of ``ResNet`` whose fixed arguments stay fixed."""

    def __call__(self, /, *args: Any, **keywords: Any) -> Any:
        if "block" in keywords or "stage_sizes" in keywords or args:
            name = getattr(self, "__name__", "this ResNet")
            raise TypeError(
                f"{name} fixes stage_sizes and block (use ow.models.ResNet to choose "
                "them) and takes keyword arguments only"
            )
        return super().__call__(**keywords)


def _variant(resnet: partial[ResNet]) -> partial[ResNet]:
    """Names and documents ``partial(ResNet, stage_sizes, block=block)``.

    The partial keeps ``ResNet``'s signature less the two arguments it fixes, every
    argument keyword-only (what ``inspect.signature`` and the API reference show),
    and gets the name and the docstring of its variant, ``ResNet50`` for a depth of
    50 (one conv for the stem, the branch's convs of every block, one FC).
    """
    (stage_sizes,), block = resnet.args, resnet.keywords["block"]
    depth = 2 + _CONVS_PER_BLOCK[block] * sum(stage_sizes)
    fixed = {"self", "stage_sizes", "block"}
    parameters = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in inspect.signature(ResNet.__init__).parameters.values()
        if p.name not in fixed
    ]
    first = ("num_classes", "in_features")  # in the order users know them
    parameters.sort(key=lambda p: first.index(p.name) if p.name in first else 2)
    others = ", ".join(f"``{p.name}``" for p in parameters[1:-1])
    partial_note = textwrap.fill(
        "A ``functools.partial`` of ``ResNet``, as flax's examples write their "
        f"variants: the other keyword arguments ({others}) are those of "
        "``ResNet``, with the same defaults.",
        width=80,
        initial_indent="    ",
        subsequent_indent="    ",
    )
    resnet.__name__ = resnet.__qualname__ = f"ResNet{depth}"  # type: ignore[attr-defined]
    resnet.__module__ = __name__
    resnet.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        parameters, return_annotation="ResNet"
    )
    call = f"ResNet, {stage_sizes}, block={block.__name__}"
    count = _TORCHVISION_PARAMETERS[depth]
    resnet.__doc__ = f"""ResNet-{depth}: ``partial({call})``.

    {count:,} parameters at 1000 classes and 3 input channels, as in torchvision.

{partial_note}

    Args:
      num_classes: the number of outputs (default 1000).
      rngs: the ``nnx.Rngs`` used by the initializers.

    Returns:
      The ``ResNet``.
    """
    return resnet


ResNet18 = _variant(_Variant(ResNet, (2, 2, 2, 2), block=BasicBlock))
ResNet34 = _variant(_Variant(ResNet, (3, 4, 6, 3), block=BasicBlock))
ResNet50 = _variant(_Variant(ResNet, (3, 4, 6, 3), block=Bottleneck))
ResNet101 = _variant(_Variant(ResNet, (3, 4, 23, 3), block=Bottleneck))


def SmallResNet1D(
    num_classes: int = 10,
    *,
    in_features: int = 1,
    stage_sizes: Sequence[int] = (1, 1, 1),
    widths: Sequence[int] = (16, 32, 64),
    zero_init_residual: bool = True,
    batch_norm_group_size: int | None = None,
    batch_norm_momentum: float = 0.9,
    batch_norm_epsilon: float = 1e-5,
    dtype: DTypeLike | None = None,
    param_dtype: DTypeLike = jnp.float32,
    rngs: nnx.Rngs,
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
      zero_init_residual: as in ``ResNet`` (default True).
      batch_norm_group_size: as in ``ResNet`` (default ``None``).
      batch_norm_momentum: as in ``ResNet`` (default 0.9).
      batch_norm_epsilon: as in ``ResNet`` (default 1e-5).
      dtype: as in ``ResNet`` (default: inferred).
      param_dtype: as in ``ResNet`` (default float32).

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
        zero_init_residual=zero_init_residual,
        batch_norm_group_size=batch_norm_group_size,
        batch_norm_momentum=batch_norm_momentum,
        batch_norm_epsilon=batch_norm_epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )
