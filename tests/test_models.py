"""Tests of optax_warmup.models: ResNets, GhostBatchNorm and init_report.

Models are tiny and share layer shapes (widths of 8, short inputs) so that XLA's
compilations are reused across tests; ResNet-18/50/101 are only built abstractly
(``nnx.eval_shape``) to count their parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_warmup as ow
from optax_warmup._ghost_batch_norm import (
    _group_stats,
    _normalize,
    _running_average,
    _split_groups,
)
from optax_warmup.models import (
    BasicBlock,
    Bottleneck,
    GhostBatchNorm,
    Layers,
    Projection,
    ResidualBlock,
    ResNet,
    init_report,
)

N_CLASSES = 5


def tiny(spatial_dims: int = 1, block: type = BasicBlock, **kwargs) -> ResNet:
    """A 2-stage ResNet: identity blocks and a stride-2 projection block."""
    basic = block is BasicBlock
    kwargs.setdefault("rngs", nnx.Rngs(0))
    return ResNet(
        (1, 1) if basic else (2, 1),
        block=block,
        widths=(8, 8) if basic else (4, 4),
        num_classes=N_CLASSES,
        in_features=1 if spatial_dims == 1 else 3,
        spatial_dims=spatial_dims,
        small_input=True,
        **kwargs,
    )


def batch(spatial_dims: int = 1, n: int = 8, seed: int = 0) -> jax.Array:
    shape = {1: (n, 12, 1), 2: (n, 6, 6, 3), 3: (n, 4, 4, 4, 3)}[spatial_dims]
    return jax.random.normal(jax.random.key(seed), shape) * 2 + 0.5


def blocks_of(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
    return [
        (path, m)
        for path, m in nnx.iter_modules(model)
        if isinstance(m, (BasicBlock, Bottleneck))
    ]


@nnx.jit
def block_io(model: ResNet, x: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """(block(x), relu(shortcut(x))) for every block along the network, in order."""
    x = jax.nn.relu(model.stem_bn(model.stem_conv(x)))
    pairs = []
    for stage in model.stages:
        for blk in stage:
            y = blk(x)
            pairs.append(
                (y, jax.nn.relu(x if blk.shortcut is None else blk.shortcut(x)))
            )
            x = y
    return pairs


def n_params(tree) -> int:
    return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(tree))


# --- parameter counts -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # torchvision.models.resnetXX(num_classes=1000): sum(p.numel() for p in
        # model.parameters()); its running statistics are buffers, not parameters.
        ("ResNet18", 11_689_512),
        ("ResNet34", 21_797_672),
        ("ResNet50", 25_557_032),
    ],
)
def test_parameter_counts_equal_torchvision(name, expected):
    abstract = nnx.eval_shape(lambda: getattr(ow.models, name)(rngs=nnx.Rngs(0)))
    assert n_params(nnx.state(abstract, nnx.Param)) == expected
    # Running statistics exist (two per BatchNorm channel) but are not parameters.
    assert n_params(nnx.state(abstract, nnx.BatchStat)) > 0


def test_resnet18_layout_matches_torchvision():
    abstract = nnx.eval_shape(lambda: ow.models.ResNet18(rngs=nnx.Rngs(0)))
    assert abstract.stem_conv.kernel.shape == (7, 7, 3, 64)
    assert abstract.stem_conv.bias is None  # convs have no bias
    assert [len(s) for s in abstract.stages] == [2, 2, 2, 2]
    assert abstract.stages[1][0].shortcut.conv.kernel.shape == (1, 1, 64, 128)
    assert abstract.stages[0][0].shortcut is None
    assert abstract.fc.kernel.shape == (512, 1000)


def test_resnet50_bottleneck_puts_stride_on_3x3():
    abstract = nnx.eval_shape(lambda: ow.models.ResNet50(rngs=nnx.Rngs(0)))
    first = abstract.stages[1][0]
    assert first.conv1.strides == 1
    assert first.conv2.strides == 2
    assert first.conv3.kernel.shape == (1, 1, 128, 512)
    assert abstract.fc.kernel.shape == (2048, 1000)


# --- initialization -------------------------------------------------------------


@pytest.mark.parametrize(
    ("spatial_dims", "block", "mode"),
    [
        (1, BasicBlock, "train"),
        (2, BasicBlock, "train"),
        (1, Bottleneck, "train"),
        (1, Bottleneck, "eval"),
    ],
)
def test_every_block_starts_as_relu_of_shortcut(spatial_dims, block, mode):
    model = tiny(spatial_dims, block)
    getattr(model, mode)()
    pairs = block_io(model, batch(spatial_dims))
    blocks = [blk for _, blk in blocks_of(model)]
    assert len(pairs) == len(blocks)
    for y, relu_shortcut in pairs:
        np.testing.assert_array_equal(y, relu_shortcut)
    # Identity and projection shortcuts both seen.
    assert {blk.shortcut is None for blk in blocks} == {True, False}


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_without_zero_init_residual_blocks_are_not_the_shortcut(block):
    model = tiny(1, block, zero_init_residual=False)
    for y, relu_shortcut in block_io(model, batch(1)):
        assert not np.allclose(y, relu_shortcut, atol=1e-3)


@pytest.mark.parametrize("zero_init_residual", [True, False])
def test_batchnorm_fc_and_conv_settings(zero_init_residual):
    model = tiny(1, Bottleneck, zero_init_residual=zero_init_residual)
    for path, m in nnx.iter_modules(model):
        if isinstance(m, nnx.BatchNorm):
            assert isinstance(m, GhostBatchNorm)
            assert (m.momentum, m.epsilon) == (0.9, 1e-5)
            np.testing.assert_array_equal(m.bias[...], 0.0)
            zero = zero_init_residual and path[-1] == "bn3"  # last BN of the branch
            np.testing.assert_array_equal(m.scale[...], 0.0 if zero else 1.0)
        elif isinstance(m, nnx.Conv):
            assert m.bias is None
    np.testing.assert_array_equal(model.fc.bias[...], 0.0)


# --- forward, backward, modes -------------------------------------------------------


def loss_fn(model: ResNet, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@nnx.jit
def loss_and_grads(model, x, y):
    return nnx.value_and_grad(loss_fn)(model, x, y)


@pytest.mark.parametrize("spatial_dims", [1, 2])
def test_forward_and_backward_under_jit(spatial_dims):
    model = tiny(spatial_dims)
    x = batch(spatial_dims)
    y = jnp.arange(8) % N_CLASSES
    before = nnx.clone(nnx.state(model, nnx.BatchStat))
    loss, grads = loss_and_grads(model, x, y)
    assert np.isfinite(loss)
    params = nnx.state(model, nnx.Param)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert np.any(grads["fc"]["kernel"][...] != 0)
    # γ = 0 of the last BN has a gradient, so the residual branch can switch on.
    assert np.any(grads["stages"][0][0]["bn2"]["scale"][...] != 0)
    # Training mode updated the running statistics.
    after = nnx.state(model, nnx.BatchStat)
    assert not np.allclose(
        before["stem_bn"]["mean"][...], after["stem_bn"]["mean"][...]
    )


def test_bf16_compute_under_jit():
    x = batch(1)
    half = tiny(1, dtype=jnp.bfloat16)
    logits = nnx.jit(lambda m, x: m(x))(half, x.astype(jnp.bfloat16))
    assert logits.dtype == jnp.bfloat16
    assert half.fc.kernel.dtype == jnp.float32  # param_dtype stays float32
    assert np.all(np.isfinite(np.asarray(logits, np.float32)))


def test_eval_mode_uses_running_statistics():
    model = tiny(1, zero_init_residual=False)
    x = batch(1)
    for seed in range(3):  # move the running statistics away from (0, 1)
        model(batch(1, seed=seed))
    # Training: an example's output depends on the rest of the batch.
    assert not np.allclose(model(x)[:2], model(x[:2]), atol=1e-4)
    model.eval()
    stats = nnx.clone(nnx.state(model, nnx.BatchStat))
    full, part = model(x), model(x[:2])
    np.testing.assert_allclose(full[:2], part, rtol=1e-5, atol=1e-6)
    # Evaluation leaves the running statistics alone.
    for a, b in zip(
        jax.tree.leaves(stats),
        jax.tree.leaves(nnx.state(model, nnx.BatchStat)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    # And one BatchNorm in eval mode is the formula with its running statistics.
    bn = model.stem_bn
    h = model.stem_conv(x)
    expected = (h - bn.mean[...]) / np.sqrt(bn.var[...] + 1e-5) * bn.scale[...]
    np.testing.assert_allclose(bn(h), expected + bn.bias[...], rtol=1e-5, atol=1e-5)


def _abstract_forward(x_shape, **kwargs):
    """Shapes of (stem conv output, logits), traced only (no compilation)."""
    model = nnx.eval_shape(
        lambda: ResNet((1,), widths=(8,), num_classes=3, rngs=nnx.Rngs(0), **kwargs)
    )
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    stem, logits = nnx.eval_shape(lambda m, x: (m.stem_conv(x), m(x)), model, x)
    return model, stem.shape, logits.shape


def test_imagenet_stem_and_3d_shapes():
    # 7x7 conv, stride 2, padding 3 (then a 3x3 max-pool, stride 2).
    _, stem, logits = _abstract_forward((2, 16, 16, 3))
    assert (stem, logits) == ((2, 8, 8, 8), (2, 3))
    _, stem, _ = _abstract_forward((2, 40, 1), in_features=1, spatial_dims=1)
    assert stem == (2, 20, 8)
    model, stem, logits = _abstract_forward(
        (2, 4, 4, 4, 3), spatial_dims=3, small_input=True
    )
    assert model.stem_conv.kernel.shape == (3, 3, 3, 3, 8)
    assert (stem, logits) == ((2, 4, 4, 4, 8), (2, 3))


def test_small_resnet_1d_on_mnist1d_shapes():
    model = ow.models.SmallResNet1D(widths=(8, 8, 8), rngs=nnx.Rngs(0))
    x = jax.ShapeDtypeStruct((4, 40, 1), jnp.float32)
    assert nnx.eval_shape(lambda m, x: m(x), model, x).shape == (4, 10)
    assert model.spatial_dims == 1 and model.small_input
    assert init_report(model) == []


# --- training ----------------------------------------------------------------------


def test_goyal_sgd_trains_a_small_resnet():
    model = tiny(1)
    tx = ow.goyal_sgd(
        batch_size=32,
        steps_per_epoch=4,
        base_lr=0.1,
        base_batch_size=8,
        warmup_epochs=0.5,
        milestones=(100,),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    # Random inputs; the label is the quintile of the input's mean (learnable).
    x = batch(1, n=32, seed=7)
    mean = x.mean(axis=(1, 2))
    y = jnp.searchsorted(jnp.quantile(mean, jnp.array([0.2, 0.4, 0.6, 0.8])), mean)
    losses = [float(step(model, optimizer, x, y)) for _ in range(12)]
    assert all(np.isfinite(losses))
    assert np.all(np.diff(losses) < 0), losses
    assert losses[-1] < 0.7 * losses[0], losses


def test_decay_mask_excludes_every_batchnorm_parameter():
    model = tiny(1, Bottleneck)
    params = nnx.state(model, nnx.Param)
    mask = ow.decay_mask(params)
    flat_mask = dict(nnx.to_flat_state(mask))
    bn_paths = {
        path for path, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)
    }
    n_bn = 0
    for path, decayed in flat_mask.items():
        decayed = decayed[...] if isinstance(decayed, nnx.Variable) else decayed
        if path[:-1] in bn_paths:
            n_bn += 1
            assert decayed is False, path
        elif path[-1] == "kernel":
            assert decayed is True, path
    assert n_bn == 2 * len(bn_paths)


# --- ghost BatchNorm ------------------------------------------------------------------


forward = nnx.jit(lambda module, x: module(x))


def _pair(c: int, g: int, *, seed: int = 0, **kwargs):
    """A GhostBatchNorm and a flax BatchNorm factory with the same γ and β."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    scale = jax.random.uniform(k1, (c,), minval=0.5, maxval=2.0)
    bias = jax.random.normal(k2, (c,))
    ghost = GhostBatchNorm(c, group_size=g, momentum=0.9, rngs=nnx.Rngs(0), **kwargs)
    ghost.scale[...], ghost.bias[...] = scale, bias

    def reference() -> nnx.BatchNorm:
        bn = nnx.BatchNorm(c, momentum=0.9, rngs=nnx.Rngs(0), **kwargs)
        bn.scale[...], bn.bias[...] = scale, bias
        return bn

    return ghost, reference


def _check_ghost_equals_per_group(shape, g, steps=3, seed=0, **kwargs):
    n, c = shape[0], shape[-1]
    ghost, reference = _pair(c, g, seed=seed, **kwargs)
    copies = [reference() for _ in range(n // g)]  # one BatchNorm per group
    for step in range(steps):
        x = jax.random.normal(jax.random.key(100 * seed + step), shape) * 3 + 1
        y = forward(ghost, x)
        for i, bn in enumerate(copies):
            part = x[i * g : (i + 1) * g]
            np.testing.assert_allclose(
                y[i * g : (i + 1) * g], forward(bn, part), atol=2e-5
            )
    for stat in ("mean", "var"):
        expected = np.mean([getattr(bn, stat)[...] for bn in copies], axis=0)
        np.testing.assert_allclose(getattr(ghost, stat)[...], expected, atol=2e-6)


@pytest.mark.parametrize(
    ("shape", "g", "use_fast_variance"),
    [
        ((12, 5, 3), 4, True),  # sequences (N, L, C)
        ((12, 5, 3), 4, False),
        ((8, 3, 3, 2), 2, True),  # images (N, H, W, C)
        ((6, 4), 3, True),  # features (N, C)
        ((8, 5, 3), 8, True),  # one group: the whole batch
    ],
)
def test_ghost_batchnorm_is_batchnorm_per_group(shape, g, use_fast_variance):
    _check_ghost_equals_per_group(shape, g, use_fast_variance=use_fast_variance)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_ghost_batchnorm_is_batchnorm_per_group_for_any_data(seed):
    _check_ghost_equals_per_group((12, 5, 3), 4, steps=2, seed=seed)


def test_ghost_group_of_whole_batch_is_ordinary_batchnorm():
    ghost, reference = _pair(3, 8)
    plain = GhostBatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))  # group_size=None
    plain.scale[...], plain.bias[...] = ghost.scale[...], ghost.bias[...]
    bn = reference()
    x = batch(1)[..., :1] * jnp.arange(1.0, 4.0)  # (8, 12, 3)
    np.testing.assert_allclose(ghost(x), bn(x), atol=2e-5)
    np.testing.assert_array_equal(plain(x), reference()(x))
    np.testing.assert_allclose(ghost.var[...], bn.var[...], atol=1e-6)
    np.testing.assert_allclose(ghost.mean[...], bn.mean[...], atol=1e-6)


def test_ghost_eval_uses_running_statistics():
    ghost, reference = _pair(3, 4)
    bn = reference()
    x = jax.random.normal(jax.random.key(1), (8, 5, 3)) + 2
    ghost(x)
    bn.mean[...], bn.var[...] = ghost.mean[...], ghost.var[...]
    ghost.eval()
    bn.eval()
    np.testing.assert_allclose(ghost(x[:3]), bn(x[:3]), atol=1e-6)  # any batch size
    np.testing.assert_allclose(
        ghost(x, use_running_average=False)[:4], _pair(3, 4)[1]()(x[:4]), atol=2e-5
    )


def test_ghost_batchnorm_under_jit_and_bf16():
    ghost, reference = _pair(3, 4, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(2), (8, 5, 3))
    y = nnx.jit(lambda m, x: m(x))(ghost, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    expected = reference()(x[4:].astype(jnp.bfloat16))
    np.testing.assert_allclose(
        np.asarray(y[4:], np.float32), np.asarray(expected, np.float32), atol=0.05
    )


def test_ghost_resnet_is_the_ordinary_resnet_on_each_group():
    ghost = tiny(1, Bottleneck, batch_norm_group_size=4)
    plain = tiny(1, Bottleneck)
    for a, b in zip(
        jax.tree.leaves(nnx.state(ghost)),
        jax.tree.leaves(nnx.state(plain)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)  # same initial parameters
    first, second = nnx.clone(plain), nnx.clone(plain)
    forward = nnx.jit(lambda m, x: m(x))
    x = batch(1, n=8, seed=3)
    y = forward(ghost, x)
    np.testing.assert_allclose(y[:4], forward(first, x[:4]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(y[4:], forward(second, x[4:]), rtol=1e-4, atol=1e-5)
    for g, a, b in zip(
        jax.tree.leaves(nnx.state(ghost, nnx.BatchStat)),
        jax.tree.leaves(nnx.state(first, nnx.BatchStat)),
        jax.tree.leaves(nnx.state(second, nnx.BatchStat)),
        strict=True,
    ):
        np.testing.assert_allclose(g, (a + b) / 2, rtol=1e-5, atol=1e-6)


def test_ghost_batch_not_divisible_raises():
    ghost, _ = _pair(3, 4)
    with pytest.raises(ValueError, match=r"batch size 10 .*group_size=4"):
        ghost(jnp.ones((10, 5, 3)))
    model = tiny(1, batch_norm_group_size=4)
    with pytest.raises(ValueError, match=r"batch size 6 .*group_size=4"):
        model(batch(1, n=6))
    model.eval()  # eval mode: any batch size
    x = jax.ShapeDtypeStruct((6, 12, 1), jnp.float32)
    assert nnx.eval_shape(lambda m, x: m(x), model, x).shape == (6, N_CLASSES)


@pytest.mark.parametrize("bad", [0, -2, 2.5])
def test_bad_group_size_raises(bad):
    with pytest.raises(ValueError, match="group_size"):
        GhostBatchNorm(3, group_size=bad, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="batch_norm_group_size"):
        tiny(1, batch_norm_group_size=bad)


def test_ghost_rejects_axis_name_and_mask():
    with pytest.raises(ValueError, match="axis_name"):
        GhostBatchNorm(3, group_size=2, axis_name="batch", rngs=nnx.Rngs(0))
    ghost, _ = _pair(3, 2)
    with pytest.raises(ValueError, match="mask"):
        ghost(jnp.ones((4, 3)), mask=jnp.ones((4, 3), bool))


# --- init_report -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spatial_dims", "block"), [(1, BasicBlock), (2, BasicBlock), (1, Bottleneck)]
)
def test_init_report_is_empty_for_our_models(spatial_dims, block):
    assert init_report(tiny(spatial_dims, block)) == []
    assert init_report(tiny(spatial_dims, block, batch_norm_group_size=2)) == []


def test_init_report_flags_every_block_without_zero_gamma():
    report = init_report(tiny(1, Bottleneck, zero_init_residual=False))
    assert len(report) == 3  # one per block
    assert all("0 BatchNorms with γ = 0" in line for line in report)


def test_init_report_detects_broken_models():
    model = tiny(1)
    model.stages[0][0].bn2.scale[...] = 1.0  # last BN of a block back to γ = 1
    assert init_report(model) == [
        "stages/0/0: 0 BatchNorms with γ = 0 on the residual branch, expected exactly 1"
    ]

    model = tiny(1)
    model.stages[1][0].bn1.scale[...] = 0.0  # a second zero-γ on the branch
    assert init_report(model) == [
        "stages/1/0: 2 BatchNorms with γ = 0 on the residual branch (bn1, bn2), "
        "expected exactly 1"
    ]

    model = tiny(1)
    model.stages[1][0].shortcut.bn.scale[...] = 0.0
    model.stem_bn.scale[...] = 0.5
    model.stages[0][0].bn1.bias[...] = 0.1
    report = init_report(model)
    assert "stages/1/0/shortcut/bn: BatchNorm γ is not 1 (shortcut)" in report
    assert "stem_bn: BatchNorm γ is not 1 (outside residual blocks)" in report
    assert "stages/0/0/bn1: BatchNorm β is not 0" in report
    assert len(report) == 3

    model = tiny(1)
    model.stages[0][0].conv1.kernel[...] *= 2
    model.fc.kernel[...] = nnx.initializers.lecun_normal()(
        jax.random.key(0), model.fc.kernel.shape
    )
    model.fc.bias[...] = 1.0
    report = init_report(model)
    assert len(report) == 3
    assert report[0].startswith("fc: FC kernel std")
    assert report[1] == "fc: FC bias is not 0"
    assert report[2].startswith("stages/0/0/conv1: conv kernel std")


def test_init_report_without_blocks_and_bad_fc_stddev():
    linear = nnx.Linear(4, 2, kernel_init=ow.gaussian_fc_init(), rngs=nnx.Rngs(0))
    assert init_report(linear) == [
        "<model>: no residual blocks found (a block is a module with a `shortcut` "
        "or `downsample` attribute)"
    ]
    with pytest.raises(ValueError, match="fc_stddev"):
        init_report(linear, fc_stddev=0.0)


class UserBlock(nnx.Module):
    """A torchvision-style block written by a user: ``downsample`` attribute."""

    def __init__(self, cin: int, cout: int, stride: int, rngs: nnx.Rngs):
        def conv(a, b, k, s):
            return nnx.Conv(
                a, b, (k,), strides=s, use_bias=False,
                kernel_init=ow.he_conv_init(), rngs=rngs,
            )  # fmt: skip

        self.conv_a, self.norm_a = (
            conv(cin, cout, 3, stride),
            nnx.BatchNorm(cout, rngs=rngs),
        )
        self.conv_b = conv(cout, cout, 3, 1)
        self.norm_b = nnx.BatchNorm(cout, scale_init=ow.zero_gamma_init(), rngs=rngs)
        self.downsample = (
            nnx.Sequential(conv(cin, cout, 1, stride), nnx.BatchNorm(cout, rngs=rngs))
            if stride != 1
            else None
        )


class UserNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.blocks = nnx.List([UserBlock(8, 8, 1, rngs), UserBlock(8, 8, 2, rngs)])
        self.head = nnx.Linear(8, 5, kernel_init=ow.gaussian_fc_init(), rngs=rngs)


def test_init_report_on_a_user_model():
    model = UserNet(nnx.Rngs(0))
    assert init_report(model) == []
    model.blocks[1].downsample.layers[1].scale[...] = 0.0
    assert init_report(model) == [
        "blocks/1/downsample/layers/1: BatchNorm γ is not 1 (shortcut)"
    ]


# --- argument checks ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(spatial_dims=4), "spatial_dims"),
        (dict(widths=(8, 8, 8)), "widths"),
        (dict(stage_sizes=()), "stage_sizes"),
        (dict(stage_sizes=(1, 0)), "stage_sizes"),
        (dict(num_classes=0), "num_classes"),
    ],
)
def test_resnet_rejects_bad_arguments(kwargs, name):
    args = dict(stage_sizes=(1, 1), widths=(8, 8), rngs=nnx.Rngs(0)) | kwargs
    with pytest.raises(ValueError, match=name):
        ResNet(args.pop("stage_sizes"), **args)


def test_resnet_rejects_wrong_input_rank():
    with pytest.raises(ValueError, match=r"3 dimensions .*\(8, 12\)"):
        tiny(1)(jnp.ones((8, 12)))


def test_public_names():
    assert "models" in ow.__all__
    for name in ("he_conv_init", "gaussian_fc_init", "zero_gamma_init"):
        assert name in ow.__all__
    assert ow.models.ResNet is ResNet


# --- the variants have real signatures ----------------------------------------------

VARIANTS = {
    "ResNet18": ((2, 2, 2, 2), BasicBlock),
    "ResNet34": ((3, 4, 6, 3), BasicBlock),
    "ResNet50": ((3, 4, 6, 3), Bottleneck),
    "ResNet101": ((3, 4, 23, 3), Bottleneck),
}


def _keywords(fn) -> dict[str, object]:
    """{name: default} of every parameter; no *args or **kwargs allowed."""
    params = inspect.signature(fn).parameters.values()
    kinds = {p.kind for p in params}
    assert inspect.Parameter.VAR_KEYWORD not in kinds
    assert inspect.Parameter.VAR_POSITIONAL not in kinds
    return {p.name: p.default for p in params}


@pytest.mark.parametrize("name", [*VARIANTS, "SmallResNet1D"])
def test_variants_have_real_signatures(name):
    fn = getattr(ow.models, name)
    params = inspect.signature(fn).parameters
    assert "num_classes" in params and "rngs" in params
    assert params["rngs"].default is inspect.Parameter.empty  # required
    # What help() and "go to definition" show: the definition of that name in
    # models.py, a def, or for the ImageNet variants one line as in flax's examples.
    assert fn.__module__ == "optax_warmup.models"
    assert fn.__qualname__ == name
    if name == "SmallResNet1D":
        assert inspect.getsource(fn).startswith(f"def {name}(")
    else:
        assert isinstance(fn, functools.partial) and fn.func is ResNet
        line = rf"^{name} = _variant\(_Variant\(ResNet, \(.*\), block=\w+\)\)$"
        assert re.search(line, inspect.getsource(ow.models), re.M)
    # Every keyword of ResNet but those the variant fixes, with ResNet's defaults.
    resnet = _keywords(ResNet.__init__)
    del resnet["self"]
    ours = _keywords(fn)
    if name == "SmallResNet1D":
        fixed = {"block", "spatial_dims", "small_input"}
        changed = {"num_classes": 10, "in_features": 1, "stage_sizes": (1, 1, 1)}
        changed["widths"] = (16, 32, 64)
    else:
        fixed, changed = {"stage_sizes", "block"}, {}
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    assert set(ours) == set(resnet) - fixed
    for key, default in ours.items():
        assert default == changed.get(key, resnet[key]), key


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_forward_every_argument(name):
    stage_sizes, block = VARIANTS[name]
    abstract = nnx.eval_shape(
        lambda: getattr(ow.models, name)(
            num_classes=7,
            in_features=2,
            widths=(8, 8, 8, 8),
            spatial_dims=1,
            small_input=True,
            zero_init_residual=False,
            batch_norm_group_size=4,
            batch_norm_momentum=0.5,
            batch_norm_epsilon=0.125,
            dtype=jnp.bfloat16,
            param_dtype=jnp.float16,
            rngs=nnx.Rngs(0),
        )
    )
    assert [len(stage) for stage in abstract.stages] == list(stage_sizes)
    assert all(isinstance(b, block) for stage in abstract.stages for b in stage)
    assert abstract.stem_conv.kernel.shape == (3, 2, 8)  # small stem, 1-D
    assert (abstract.spatial_dims, abstract.small_input) == (1, True)
    assert abstract.fc.kernel.shape == (8 * block.expansion, 7)
    assert abstract.fc.kernel.dtype == jnp.float16
    assert abstract.fc.dtype == jnp.bfloat16
    norms = [m for _, m in nnx.iter_modules(abstract) if isinstance(m, nnx.BatchNorm)]
    assert norms
    for m in norms:
        assert (m.momentum, m.epsilon, m.group_size) == (0.5, 0.125, 4)
        assert m.dtype == jnp.bfloat16


def test_resnet101_parameter_count_equals_torchvision():
    abstract = nnx.eval_shape(lambda: ow.models.ResNet101(rngs=nnx.Rngs(0)))
    assert n_params(nnx.state(abstract, nnx.Param)) == 44_549_160


# --- BatchNorm momentum and epsilon -------------------------------------------------


def _record_batchnorm_calls(monkeypatch) -> list[tuple]:
    """Records (layer, input, output, running mean, running var before) of each call."""
    calls = []
    original = GhostBatchNorm.__call__

    def recording(self, x, *args, **kwargs):
        before = (np.asarray(self.mean[...]), np.asarray(self.var[...]))
        y = original(self, x, *args, **kwargs)
        calls.append((self, np.asarray(x, np.float64), np.asarray(y), *before))
        return y

    monkeypatch.setattr(GhostBatchNorm, "__call__", recording)
    return calls


@pytest.mark.parametrize("group_size", [None, 4])
def test_momentum_and_epsilon_reach_every_batchnorm(monkeypatch, group_size):
    m, eps = 0.7, 0.25  # far from flax's (0.99, 1e-5) and ours (0.9, 1e-5)
    model = tiny(
        1,
        Bottleneck,
        zero_init_residual=False,
        batch_norm_group_size=group_size,
        batch_norm_momentum=m,
        batch_norm_epsilon=eps,
    )
    norms = [
        mod for _, mod in nnx.iter_modules(model) if isinstance(mod, nnx.BatchNorm)
    ]
    assert len(norms) == 1 + 3 * 3 + 2  # stem, three blocks, two projections
    for bn in norms:
        assert (bn.momentum, bn.epsilon) == (m, eps)

    calls = _record_batchnorm_calls(monkeypatch)
    model(batch(1))  # one training-mode forward pass, eagerly
    assert {id(c[0]) for c in calls} == {id(bn) for bn in norms}  # each, once
    g = group_size or 8
    for bn, x, y, mean_before, var_before in calls:
        # numpy: statistics of each group of g over (examples, length).
        groups = x.reshape(-1, g, *x.shape[1:])
        mean = groups.mean(axis=(1, 2), keepdims=True)
        var = ((groups - mean) ** 2).mean(axis=(1, 2), keepdims=True)
        scale, bias = np.asarray(bn.scale[...]), np.asarray(bn.bias[...])
        expected = (groups - mean) / np.sqrt(var + eps) * scale + bias
        np.testing.assert_allclose(y, expected.reshape(x.shape), rtol=1e-4, atol=1e-4)
        new_mean = m * mean_before + (1 - m) * mean.mean(axis=0).ravel()
        new_var = m * var_before + (1 - m) * var.mean(axis=0).ravel()
        np.testing.assert_allclose(bn.mean[...], new_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn.var[...], new_var, rtol=1e-5, atol=1e-6)


def test_jitted_train_step_moves_running_stats_with_the_momentum():
    m = 0.25
    model = tiny(1, batch_norm_momentum=m)
    x, y = batch(1), jnp.arange(8) % N_CLASSES
    h = np.asarray(model.stem_conv(x), np.float64)  # the stem BatchNorm's input
    loss_and_grads(model, x, y)
    np.testing.assert_allclose(
        model.stem_bn.mean[...], (1 - m) * h.mean(axis=(0, 1)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        model.stem_bn.var[...], m + (1 - m) * h.var(axis=(0, 1)), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(batch_norm_momentum=1.5), "batch_norm_momentum"),
        (dict(batch_norm_momentum=-0.1), "batch_norm_momentum"),
        (dict(batch_norm_momentum=float("nan")), "batch_norm_momentum"),
        (dict(batch_norm_epsilon=-1e-5), "batch_norm_epsilon"),
        (dict(batch_norm_epsilon=float("inf")), "batch_norm_epsilon"),
    ],
)
def test_bad_momentum_or_epsilon_raises(kwargs, name):
    with pytest.raises(ValueError, match=name) as info:
        tiny(1, **kwargs)
    assert str(next(iter(kwargs.values()))) in str(info.value)
    with pytest.raises(ValueError, match=name):
        Layers(**kwargs)


# --- the layer builder ---------------------------------------------------------------


def test_layers_builds_convs_norms_shortcuts_and_the_classifier():
    layers = Layers(
        spatial_dims=1,
        batch_norm_group_size=2,
        batch_norm_momentum=0.8,
        batch_norm_epsilon=1e-3,
        dtype=jnp.bfloat16,
    )
    rngs = nnx.Rngs(0)
    conv = layers.conv(64, 128, 3, 2, rngs=rngs)
    assert conv.kernel.shape == (3, 64, 128)
    assert conv.kernel.dtype == jnp.float32 and conv.dtype == jnp.bfloat16
    assert (conv.strides, conv.padding, conv.bias) == (2, [(1, 1)], None)
    std = np.asarray(conv.kernel[...]).std()
    assert abs(std / math.sqrt(2 / (3 * 128)) - 1) < 0.05  # He, fan-out

    norm = layers.norm(16, rngs=rngs)
    assert (norm.group_size, norm.momentum, norm.epsilon) == (2, 0.8, 1e-3)
    np.testing.assert_array_equal(norm.scale[...], np.ones(16))
    np.testing.assert_array_equal(norm.bias[...], np.zeros(16))
    last = layers.norm(16, last_of_branch=True, rngs=rngs)
    np.testing.assert_array_equal(last.scale[...], np.zeros(16))
    no_zero = dataclasses.replace(layers, zero_init_residual=False)
    last = no_zero.norm(16, last_of_branch=True, rngs=rngs)
    np.testing.assert_array_equal(last.scale[...], np.ones(16))

    assert layers.shortcut(16, 16, 1, rngs=rngs) is None
    for cin, cout, stride in [(16, 16, 2), (16, 32, 1)]:
        proj = layers.shortcut(cin, cout, stride, rngs=rngs)
        assert isinstance(proj, Projection)
        assert proj.conv.kernel.shape == (1, cin, cout)
        assert proj.conv.strides == stride
        np.testing.assert_array_equal(proj.bn.scale[...], np.ones(cout))

    fc = layers.linear(512, 1000, rngs=rngs)
    assert abs(np.asarray(fc.kernel[...]).std() / 0.01 - 1) < 0.03
    np.testing.assert_array_equal(fc.bias[...], np.zeros(1000))
    assert fc.dtype == jnp.bfloat16


def test_layers_is_frozen_hashable_and_validated():
    layers = Layers()
    assert (layers.batch_norm_momentum, layers.batch_norm_epsilon) == (0.9, 1e-5)
    assert (layers.spatial_dims, layers.zero_init_residual) == (2, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layers.spatial_dims = 1
    assert hash(layers) == hash(Layers()) and layers == Layers()
    assert layers != Layers(batch_norm_momentum=0.99)
    with pytest.raises(ValueError, match="spatial_dims"):
        Layers(spatial_dims=0)
    with pytest.raises(ValueError, match="batch_norm_group_size"):
        Layers(batch_norm_group_size=0)


class WideBlock(ResidualBlock):
    """A block written by a user from ``Layers``: one 5-wide conv and a BatchNorm."""

    expansion = 2
    seen: list[Layers] = []  # noqa: RUF012 - the Layers each block was given

    def __init__(self, in_features, features, *, strides=1, layers, rngs):
        WideBlock.seen.append(layers)
        out = features * self.expansion
        self.conv = layers.conv(in_features, out, 5, strides, rngs=rngs)
        self.bn = layers.norm(out, last_of_branch=True, rngs=rngs)
        self.shortcut = layers.shortcut(in_features, out, strides, rngs=rngs)

    def branch(self, x):
        return self.bn(self.conv(x))


def test_a_users_block_gets_the_networks_layers():
    WideBlock.seen.clear()
    model = tiny(
        1, WideBlock, batch_norm_group_size=2, batch_norm_momentum=0.6, dtype=None
    )
    assert (
        WideBlock.seen
        == [Layers(spatial_dims=1, batch_norm_group_size=2, batch_norm_momentum=0.6)]
        * 3
    )
    assert model.fc.kernel.shape == (4 * 2, N_CLASSES)  # expansion is used
    assert init_report(model) == []
    pairs = block_io(model, batch(1))
    assert len(pairs) == 3
    for y, relu_shortcut in pairs:  # zero-γ came from the builder
        np.testing.assert_array_equal(y, relu_shortcut)


def test_blocks_built_on_their_own_from_layers():
    layers = Layers(spatial_dims=1, zero_init_residual=False)
    block = BasicBlock(8, 16, strides=2, layers=layers, rngs=nnx.Rngs(0))
    assert isinstance(block.shortcut, Projection)
    assert block.conv1.kernel.shape == (3, 8, 16) and block.conv1.strides == 2
    np.testing.assert_array_equal(block.bn2.scale[...], np.ones(16))
    x = batch(1, n=4)[..., :1] * jnp.ones(8)  # (4, 12, 8)
    y = block(x)
    assert y.shape == (4, 6, 16)
    np.testing.assert_array_equal(y, jax.nn.relu(block.branch(x) + block.shortcut(x)))
    default = Bottleneck(16, 4, rngs=nnx.Rngs(0))  # Layers(): 2-D, zero-γ
    assert default.conv2.kernel.shape == (3, 3, 4, 4)
    assert default.shortcut is None  # 16 == 4 * expansion, stride 1
    np.testing.assert_array_equal(default.bn3.scale[...], np.zeros(16))


def test_residual_block_without_init_raises():
    class NoInit(ResidualBlock):
        pass

    with pytest.raises(NotImplementedError, match="NoInit must define __init__"):
        NoInit(8, 8, rngs=nnx.Rngs(0))


# --- the pure helpers of GhostBatchNorm ----------------------------------------------


def _random(shape, seed=0, dtype=jnp.float32):
    return (jax.random.normal(jax.random.key(seed), shape) * 3 + 1).astype(dtype)


def test_split_groups_takes_consecutive_examples():
    x = _random((12, 5, 3))
    groups = _split_groups(x, 4)
    assert groups.shape == (3, 4, 5, 3)
    for j in range(3):
        np.testing.assert_array_equal(groups[j], x[4 * j : 4 * j + 4])


@pytest.mark.parametrize("use_fast_variance", [True, False])
@pytest.mark.parametrize(
    ("shape", "feature_axis", "reduce"),
    [
        ((3, 4, 5, 2), 3, (1, 2)),  # features last
        ((2, 3, 4, 5), 2, (1, 3)),  # features in the middle (input axis 1)
        ((4, 2, 6), 2, (1,)),  # (N, C) input
    ],
)
def test_group_stats_against_numpy(shape, feature_axis, reduce, use_fast_variance):
    groups = _random(shape, seed=1)
    mean, var = _group_stats(
        groups, feature_axis, dtype=None, use_fast_variance=use_fast_variance
    )
    x = np.asarray(groups, np.float64)
    ref_mean = x.mean(axis=reduce, keepdims=True)
    ref_var = ((x - ref_mean) ** 2).mean(axis=reduce, keepdims=True)
    assert mean.shape == var.shape == ref_mean.shape
    assert mean.dtype == var.dtype == jnp.float32
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, ref_var, rtol=1e-5, atol=1e-5)


def test_group_stats_of_bf16_are_float32_and_never_negative():
    groups = _random((2, 4, 5, 3), seed=2, dtype=jnp.bfloat16)
    mean, var = _group_stats(groups, 3, dtype=None, use_fast_variance=True)
    assert mean.dtype == var.dtype == jnp.float32
    x = np.asarray(groups, np.float64)  # the bf16 values, exactly
    np.testing.assert_allclose(mean, x.mean(axis=(1, 2), keepdims=True), atol=1e-5)
    # A constant group: E[x²] - E[x]² may round below 0; it is clipped at 0.
    constant = jnp.full((1, 4, 5, 3), 1e3 + 0.1, jnp.float32)
    _, var = _group_stats(constant, 3, dtype=None, use_fast_variance=True)
    assert np.all(np.asarray(var) >= 0)


@pytest.mark.parametrize("affine", [True, False])
def test_normalize_against_numpy(affine):
    groups = _random((3, 4, 5, 2), seed=3)
    x = np.asarray(groups, np.float64)
    mean = x.mean(axis=(1, 2), keepdims=True)
    var = x.var(axis=(1, 2), keepdims=True)
    scale = np.array([0.5, 2.0]) if affine else None
    bias = np.array([-1.0, 3.0]) if affine else None
    eps = 0.1
    y = _normalize(
        groups,
        jnp.asarray(mean, jnp.float32),
        jnp.asarray(var, jnp.float32),
        None if scale is None else jnp.asarray(scale, jnp.float32),
        None if bias is None else jnp.asarray(bias, jnp.float32),
        3,
        eps,
    )
    expected = (x - mean) / np.sqrt(var + eps)
    if affine:
        expected = expected * scale + bias
    assert y.shape == groups.shape
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_normalize_with_features_in_the_middle():
    groups = _random((2, 3, 4, 5), seed=4)  # features on axis 2
    x = np.asarray(groups, np.float64)
    mean = x.mean(axis=(1, 3), keepdims=True)
    var = x.var(axis=(1, 3), keepdims=True)
    scale, bias = np.arange(1.0, 5.0), np.arange(4.0)
    y = _normalize(
        groups,
        jnp.asarray(mean, jnp.float32),
        jnp.asarray(var, jnp.float32),
        jnp.asarray(scale, jnp.float32),
        jnp.asarray(bias, jnp.float32),
        2,
        1e-5,
    )
    expected = (x - mean) / np.sqrt(var + 1e-5) * scale[:, None] + bias[:, None]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_running_average_against_numpy():
    running = np.array([0.5, -1.0, 2.0], np.float32)
    stats = np.asarray(_random((4, 1, 1, 3), seed=5))  # one statistic per group
    m = 0.8
    new = _running_average(jnp.asarray(running), jnp.asarray(stats), m)
    assert new.shape == running.shape
    expected = m * running + (1 - m) * stats.mean(axis=0).ravel()
    np.testing.assert_allclose(new, expected, rtol=1e-6, atol=1e-6)
    # m = 1 keeps the running statistic; m = 0 replaces it by the groups' mean.
    kept = _running_average(jnp.asarray(running), jnp.asarray(stats), 1.0)
    np.testing.assert_array_equal(kept, running)
    replaced = _running_average(jnp.asarray(running), jnp.asarray(stats), 0.0)
    np.testing.assert_allclose(replaced, stats.mean(axis=0).ravel(), rtol=1e-6)


# --- init_report and fan_out -------------------------------------------------------


def test_init_report_checks_convs_against_fan_out():
    # in != out: a fan-in kernel's std is twice the fan-out target here.
    layers = Layers(spatial_dims=1)
    block = BasicBlock(16, 64, strides=2, layers=layers, rngs=nnx.Rngs(1))

    class OneBlock(nnx.Module):
        def __init__(self):
            self.block = block

    assert init_report(OneBlock()) == []
    shape = block.conv1.kernel.shape  # (3, 16, 64)
    fan_in_std = math.sqrt(2 / (3 * 16))
    block.conv1.kernel[...] = fan_in_std * jax.random.normal(jax.random.key(2), shape)
    report = init_report(OneBlock())
    assert len(report) == 1
    assert report[0].startswith("block/conv1: conv kernel std")
    assert f"expected {math.sqrt(2 / (3 * 64)):.4g}" in report[0]


def test_variants_keep_their_block_and_stages_fixed():
    with pytest.raises(TypeError, match="ResNet18 fixes stage_sizes and block"):
        ow.models.ResNet18(block=ow.models.Bottleneck, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="keyword arguments only"):
        ow.models.ResNet50(10, rngs=nnx.Rngs(0))
