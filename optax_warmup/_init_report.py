"""An audit of a ResNet-style nnx model's initialization against Goyal's rules.

Public as ``optax_warmup.models.init_report``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import nnx

from optax_warmup._initializers import fan_out
from optax_warmup._validation import check_real

_SHORTCUT_NAMES = ("shortcut", "downsample")
_BRANCH = "residual branch"

# A module's path in the model, as nnx.iter_modules yields it.
_ModulePath = tuple[Any, ...]


def _name(path: _ModulePath) -> str:
    return "/".join(str(k) for k in path) or "<model>"


def _values(variable: nnx.Variable[Any] | None) -> np.ndarray | None:
    if variable is None:
        return None
    return np.asarray(variable[...], dtype=np.float64)


def _std_deviation(
    path: _ModulePath, what: str, sample: np.ndarray, target: float
) -> list[str]:
    """A deviation when the sample std is off ``target`` by more than sampling noise.

    The std of n normal draws has a relative sampling error of about 1 / sqrt(2n); the
    tolerance is five of those plus 5 %, so a correct initializer passes (all but
    never fails) while a wrong scale such as fan-in for fan-out or flax's default
    LeCun init of a classifier is caught on any layer of realistic size.
    """
    n = sample.size
    std = float(sample.std())
    tol = 0.05 + 5.0 / math.sqrt(2.0 * n)
    if abs(std / target - 1.0) > tol:
        return [
            f"{_name(path)}: {what} std {std:.4g}, expected {target:.4g} "
            f"(tolerance ±{tol:.0%}, {n} values)"
        ]
    return []


def _zero_bias(path: _ModulePath, layer: nnx.Module, what: str) -> list[str]:
    """A deviation when the layer has a bias (``None`` counts as none) that is not 0."""
    bias = _values(getattr(layer, "bias", None))
    if bias is not None and np.any(bias != 0):
        return [f"{_name(path)}: {what} is not 0"]
    return []


# --- one rule per layer type ---------------------------------------------------------


def _conv_rule(path: _ModulePath, conv: nnx.Conv) -> list[str]:
    """Rule 1: kernel std ≈ sqrt(2 / fan_out), bias 0."""
    kernel = np.asarray(conv.kernel[...], np.float64)
    target = math.sqrt(2.0 / fan_out(kernel.shape))
    return _std_deviation(path, "conv kernel", kernel, target) + _zero_bias(
        path, conv, "conv bias"
    )


def _linear_rule(path: _ModulePath, linear: nnx.Linear, fc_stddev: float) -> list[str]:
    """Rule 2: kernel std ≈ ``fc_stddev``, bias 0."""
    kernel = np.asarray(linear.kernel[...], np.float64)
    return _std_deviation(path, "FC kernel", kernel, fc_stddev) + _zero_bias(
        path, linear, "FC bias"
    )


def _batch_norm_rule(path: _ModulePath, norm: nnx.BatchNorm, where: str) -> list[str]:
    """Rule 3 for one BatchNorm: β = 0, and γ = 1 unless it is on a residual branch.

    ``where`` is ``_BRANCH`` (its γ is checked with the rest of the branch, by
    ``_residual_branch_rule``), ``"shortcut"`` or ``"outside residual blocks"``.
    """
    report = _zero_bias(path, norm, "BatchNorm β")
    gamma = _values(norm.scale)
    if where != _BRANCH and gamma is not None and np.any(gamma != 1):
        report.append(f"{_name(path)}: BatchNorm γ is not 1 ({where})")
    return report


def _residual_branch_rule(
    block: _ModulePath, norms: Sequence[tuple[_ModulePath, np.ndarray | None]]
) -> list[str]:
    """Rule 3 for one block: exactly one γ = 0 on its branch, every other γ = 1.

    ``norms`` are the (path, γ) of the BatchNorms on the block's residual branch.
    """
    zeros = [p for p, g in norms if g is not None and np.all(g == 0)]
    report: list[str] = []
    if len(zeros) != 1:
        names = f" ({', '.join(_name(p[len(block) :]) for p in zeros)})"
        report.append(
            f"{_name(block)}: {len(zeros)} BatchNorms with γ = 0 on the residual "
            f"branch{names if zeros else ''}, expected exactly 1"
        )
    for path, gamma in norms:
        if path not in zeros and gamma is not None and np.any(gamma != 1):
            report.append(f"{_name(path)}: BatchNorm γ is neither all 0 nor all 1")
    return report


def _placement(
    path: _ModulePath, blocks: Sequence[_ModulePath]
) -> tuple[_ModulePath | None, str]:
    """Where a module sits: (the block whose branch holds it or ``None``, where).

    A module belongs to the innermost block that contains it; ``where`` is
    ``_BRANCH``, ``"shortcut"`` (inside the block's shortcut attribute) or
    ``"outside residual blocks"``.
    """
    owners = [b for b in blocks if path[: len(b)] == b and path != b]
    if not owners:
        return None, "outside residual blocks"
    owner = max(owners, key=len)
    if path[len(owner)] in _SHORTCUT_NAMES:
        return None, "shortcut"
    return owner, _BRANCH


def init_report(model: nnx.Module, *, fc_stddev: float = 0.01) -> list[str]:
    r"""Lists how a ResNet-style nnx model's initialization deviates from Goyal's rules.

    The rules (Goyal et al. 2017, Sec. 5.1; He et al. 2019, Sec. 3.1):

    1. every convolution kernel is He normal in fan-out mode: sample std
       :math:`\approx\sqrt{2/\text{fan\_out}}`, ``fan_out`` = spatial size × output
       channels; a conv bias, if any, is 0;
    2. every ``nnx.Linear`` (taken to be the classifier) has kernel std
       :math:`\approx` ``fc_stddev`` and bias 0;
    3. every BatchNorm has β = 0 and γ = 1, except that each residual block has
       exactly one BatchNorm with γ = 0 on its residual branch and none on its
       shortcut.

    What it expects of the model's structure: a *residual block* is any submodule
    with an attribute named ``shortcut`` or ``downsample`` (torchvision's name),
    holding the shortcut module or ``None`` for an identity shortcut. BatchNorms
    (``nnx.BatchNorm`` and subclasses such as ``GhostBatchNorm``) inside that
    attribute are on the shortcut; every other BatchNorm inside the block is on the
    residual branch (a BatchNorm belongs to the innermost block that contains it).
    BatchNorms outside every block (the stem) must have γ = 1. The audit counts the
    zero-γ BatchNorms of each branch but does not check that the zero one is the
    *last* (module attributes carry no order). Std checks compare the sample std to
    the target with a tolerance of 5 % plus five times the sampling error
    (:math:`1/\sqrt{2n}` relative), so they tell fan-in from fan-out only where
    those differ. The model must be concrete (not from ``nnx.eval_shape``); run the
    audit before training, since γ and β move as soon as the model trains.

    Args:
      model: the ``nnx.Module`` to audit.
      fc_stddev: the expected std of every ``nnx.Linear`` kernel (default 0.01, the
        paper's value); a positive finite number.

    Returns:
      A list of human-readable deviations, each starting with the module's path
      (e.g. ``"stages/0/1: ..."``); empty when the model follows the rules. A
      model without residual blocks gets one entry saying so. A model built with
      ``zero_init_residual=False`` gets one entry per block.

    Example:
      >>> from flax import nnx
      >>> import optax_warmup as ow
      >>> model = ow.models.SmallResNet1D(widths=(8, 8, 8), rngs=nnx.Rngs(0))
      >>> ow.models.init_report(model)
      []
      >>> model.stages[0][0].bn2.scale[...] = 1.0  # undo zero-γ in one block
      >>> ow.models.init_report(model)
      ['stages/0/0: 0 BatchNorms with γ = 0 on the residual branch, expected exactly 1']

    References:
      Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
      arXiv:1706.02677 (Sec. 5.1).
      He et al. 2019, Bag of Tricks for Image Classification with Convolutional
      Neural Networks, arXiv:1812.01187 (Sec. 3.1).
    """
    check_real("fc_stddev", fc_stddev, low=0.0, low_open=True)
    modules = list(nnx.iter_modules(model))
    blocks = [
        path
        for path, module in modules
        if any(hasattr(module, name) for name in _SHORTCUT_NAMES)
    ]
    report: list[str] = []
    if not blocks:
        report.append(
            "<model>: no residual blocks found (a block is a module with a "
            "`shortcut` or `downsample` attribute)"
        )

    branch_norms: dict[_ModulePath, list[tuple[_ModulePath, np.ndarray | None]]] = {
        b: [] for b in blocks
    }
    for path, module in modules:
        if isinstance(module, nnx.BatchNorm):
            block, where = _placement(path, blocks)
            report += _batch_norm_rule(path, module, where)
            if block is not None:
                branch_norms[block].append((path, _values(module.scale)))
        elif isinstance(module, nnx.Conv):
            report += _conv_rule(path, module)
        elif isinstance(module, nnx.Linear):
            report += _linear_rule(path, module, float(fc_stddev))
    for block in blocks:
        report += _residual_branch_rule(block, branch_norms[block])
    return report
