"""The model of every experiment: the zero-γ ``SmallResNet1D`` with ghost BatchNorm.

``ow.models.SmallResNet1D`` on MNIST-1D's 10 classes, its residual branches ending
in a zero-initialized BatchNorm scale (Goyal et al.'s zero-γ), and BatchNorm
statistics over groups of n examples inside a larger batch (ghost BatchNorm), as
Goyal's workers computed them on n examples each.
"""

from __future__ import annotations

from collections.abc import Sequence

from flax import nnx

import optax_warmup as ow
from optax_warmup.demo.data import NUM_CLASSES


def small_resnet(widths: Sequence[int], group: int, seed: int) -> nnx.Module:
    """A fresh ``SmallResNet1D`` of stage ``widths``, BatchNorm over groups of
    ``group`` examples, initialized from ``seed`` (the same seed gives every
    configuration the same initial weights)."""
    return ow.models.SmallResNet1D(
        num_classes=NUM_CLASSES,
        widths=tuple(widths),
        batch_norm_group_size=group,
        rngs=nnx.Rngs(seed),
    )
