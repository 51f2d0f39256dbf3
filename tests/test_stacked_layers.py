"""Stacked (scanned) layers: the default mask decides every stacked leaf as it
decides the same layer unstacked, in nnx, linen and for a stack of BatchNorms; the
recipes, their trust ratios and decay_report read ``stacked`` alike, however the
mask is built."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.training import train_state

import optax_warmup as ow

L = 4


def flat(tree):
    leaves = jax.tree_util.tree_leaves_with_path(
        tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    return {
        "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): leaf
        for path, leaf in leaves
    }


class Block(nnx.Module):
    def __init__(self, rngs):
        self.ln = nnx.LayerNorm(16, rngs=rngs)
        self.fc = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, x):
        return x + self.fc(self.ln(x))


class Stacked(nnx.Module):
    """L blocks made with nnx.vmap and applied with nnx.scan: the usual transformer."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return Block(rngs)

        self.blocks = create(rngs)
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return self.head(body(x, self.blocks))


class Unstacked(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([Block(rngs) for _ in range(L)])
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def counterpart(path):
    """'blocks/fc/bias' of the stack is 'blocks/0/fc/bias' unstacked."""
    parts = path.split("/")
    return "/".join([parts[0], "0", *parts[1:]]) if parts[0] == "blocks" else path


def assert_masks_agree(stacked_mask, unstacked_mask):
    stacked_mask, unstacked_mask = flat(stacked_mask), flat(unstacked_mask)
    assert stacked_mask  # something was compared
    for path, decayed in stacked_mask.items():
        assert decayed is unstacked_mask[counterpart(path)], path


def test_nnx_scan_mask_equals_the_unstacked_mask_and_the_report_says_no():
    stacked = nnx.state(Stacked(nnx.Rngs(0)), nnx.Param)
    unstacked = nnx.state(Unstacked(nnx.Rngs(0)), nnx.Param)
    assert flat(stacked)["blocks/fc/bias"].shape == (L, 16)
    assert_masks_agree(ow.decay_mask(stacked), ow.decay_mask(unstacked))
    assert_masks_agree(
        ow.decay_mask(stacked, stacked={"blocks": 1}), ow.decay_mask(unstacked)
    )
    rows = {
        line.split()[0]: line.split() for line in ow.decay_report(stacked).splitlines()
    }
    for path in ("blocks/fc/bias", "blocks/ln/bias", "blocks/ln/scale", "head/bias"):
        assert rows[path][-4:] == ["no", "bias", "or", "norm"], rows[path]
    assert rows["blocks/fc/kernel"][-3:] == ["yes", "rank", "3"]
    # Declared, the report shows one layer's shape, and the rank of one layer.
    report = ow.decay_report(stacked, stacked={"blocks": 1})
    kernel = next(line for line in report.splitlines() if "blocks/fc/kernel" in line)
    assert "4 × (16, 16)" in kernel and kernel.endswith("yes      rank 2")


def test_linen_scan_mask_equals_the_unrolled_mask():
    class LinenBlock(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + nn.Dense(16)(nn.LayerNorm()(x)), None

    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(
                LinenBlock,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=L,
            )
            x, _ = scan(name="blocks")(x, None)
            return nn.Dense(10, name="head")(x)

    class Unrolled(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(L):
                x, _ = LinenBlock(name=f"blocks_{i}")(x, None)
            return nn.Dense(10, name="head")(x)

    x = jnp.ones((2, 16))
    scanned = Scanned().init(jax.random.key(0), x)["params"]
    unrolled = Unrolled().init(jax.random.key(0), x)["params"]
    assert scanned["blocks"]["LayerNorm_0"]["scale"].shape == (L, 16)
    got, expected = flat(ow.decay_mask(scanned)), flat(ow.decay_mask(unrolled))
    for path, decayed in got.items():
        assert decayed is expected[path.replace("blocks/", "blocks_0/")], path
    assert got["blocks/Dense_0/kernel"] and not got["blocks/LayerNorm_0/scale"]


def test_a_stack_of_batch_norms_is_never_decayed():
    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return nnx.BatchNorm(8, rngs=rngs)

    stack = nnx.state(create(nnx.Rngs(0)), nnx.Param)
    single = nnx.state(nnx.BatchNorm(8, rngs=nnx.Rngs(0)), nnx.Param)
    assert flat(stack)["scale"].shape == (L, 8)
    assert flat(ow.decay_mask(stack)) == flat(ow.decay_mask(single))
    assert not any(flat(ow.decay_mask(stack)).values())


@pytest.mark.parametrize("where", ["nnx.Optimizer", "TrainState"])
def test_a_goyal_sgd_step_moves_no_stacked_bias_or_norm_parameter(where):
    # Zero gradients: only weight decay moves a parameter.
    tx = ow.goyal_sgd(batch_size=256, steps_per_epoch=10, weight_decay=0.1)
    if where == "nnx.Optimizer":
        model = Stacked(nnx.Rngs(0))
        assert model(jnp.ones((3, 16))).shape == (3, 10)  # the scan runs
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        before = flat(nnx.clone(nnx.state(model, nnx.Param)))
        zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
        nnx.jit(lambda o, m, g: o.update(m, g))(optimizer, model, zeros)
        after = flat(nnx.state(model, nnx.Param))
        before = {k: v[...] for k, v in before.items()}
        after = {k: v[...] for k, v in after.items()}
    else:
        params = jax.tree.map(
            lambda v: v[...],
            nnx.to_pure_dict(nnx.state(Stacked(nnx.Rngs(0)), nnx.Param)),
        )
        state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
        zeros = jax.tree.map(jnp.zeros_like, params)
        new = jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, zeros)
        before, after = flat(state.params), flat(new.params)
    for path in ("blocks/fc/bias", "blocks/ln/bias", "blocks/ln/scale", "head/bias"):
        np.testing.assert_array_equal(after[path], before[path])
    for path in ("blocks/fc/kernel", "head/kernel"):
        np.testing.assert_allclose(
            after[path], before[path] * (1 - 0.1 * 0.1), rtol=1e-6
        )


# An adjusted mask (a partial of decay_mask, or a function of one's own that takes
# ``stacked``) reads the recipe's ``stacked`` as the report does.

GAIN_PARAMS = {
    "blocks": {
        "gain": jnp.full((3, 4), 3.0),  # a per-layer gain of one's own: rank 1
        "fc": {"kernel": jnp.full((3, 4, 4), 3.0)},
    }
}
INCLUDE_KERNEL = functools.partial(ow.decay_mask, include="kernel")


def report_says(params, mask, **kwargs):
    """{path: decayed} as ``decay_report`` prints it."""
    header, *lines = ow.decay_report(params, mask, **kwargs).splitlines()[:-3]
    column = header.index("decayed")
    return {line.split()[0]: line[column:].startswith("yes") for line in lines}


def own_mask(params, *, stacked=None):
    """A mask of one's own that reads ``stacked``: decay_mask without exclusions."""
    return ow.decay_mask(params, stacked=stacked)


@pytest.mark.parametrize("recipe", ["sgd", "lars", "lamb", "adamw"])
@pytest.mark.parametrize("mask", [INCLUDE_KERNEL, own_mask], ids=["partial", "own"])
def test_an_adjusted_mask_reads_stacked_as_the_report_does(recipe, mask):
    make = getattr(ow, recipe)
    zeros = jax.tree.map(jnp.zeros_like, GAIN_PARAMS)
    tx = make(1.0, weight_decay=0.5, mask=mask, stacked={"blocks": 1})
    updates, _ = tx.update(zeros, tx.init(GAIN_PARAMS), GAIN_PARAMS)
    np.testing.assert_array_equal(updates["blocks"]["gain"], 0.0)  # not decayed
    assert float(jnp.abs(updates["blocks"]["fc"]["kernel"]).max()) > 0.0  # decayed
    assert report_says(GAIN_PARAMS, mask, stacked={"blocks": 1}) == {
        "blocks/fc/kernel": True,
        "blocks/gain": False,
    }


@pytest.mark.parametrize("recipe", ["lars", "lamb"])
def test_an_adjusted_mask_keeps_the_trust_ratio_off_a_stacked_gain(recipe):
    ones = jax.tree.map(jnp.ones_like, GAIN_PARAMS)
    kwargs = dict(weight_decay=0.0, stacked={"blocks": 1})
    if recipe == "lars":
        kwargs.update(momentum=0.0, trust_coefficient=0.5)
    tx = getattr(ow, recipe)(1.0, mask=INCLUDE_KERNEL, **kwargs)
    updates, _ = tx.update(ones, tx.init(GAIN_PARAMS), GAIN_PARAMS)
    # Without a trust ratio the gain takes the plain step at the global rate:
    # −η·g for LARS, −η·(Adam's first step ≈ sign g) for LAMB. With one, the step
    # would be scaled by c·‖w‖/‖g‖ (0.5·6/2 = 1.5) or ‖w‖/‖r‖ (6/2 = 3) per layer.
    np.testing.assert_allclose(updates["blocks"]["gain"], -1.0, rtol=1e-5)
    kernel = 0.5 * 12 / 4 if recipe == "lars" else 12 / 4
    np.testing.assert_allclose(updates["blocks"]["fc"]["kernel"], -kernel, rtol=1e-5)


@pytest.mark.parametrize(
    "mask",
    [
        ow.decay_mask,
        INCLUDE_KERNEL,
        functools.partial(ow.decay_mask, exclude="kernel"),
        functools.partial(ow.decay_mask, stacked={}),  # its own: no stacked layers
        own_mask,
        lambda p: jax.tree.map(lambda x: x.ndim == 2, p),
        {"blocks": {"gain": True, "fc": False}},
        None,
    ],
    ids=["default", "include", "exclude", "own-stacked", "own", "fn", "tree", "none"],
)
def test_the_report_and_the_optimizer_never_disagree(mask):
    zeros = jax.tree.map(jnp.zeros_like, GAIN_PARAMS)
    tx = ow.sgd(1.0, momentum=0.0, weight_decay=0.5, mask=mask, stacked={"blocks": 1})
    updates, _ = tx.update(zeros, tx.init(GAIN_PARAMS), GAIN_PARAMS)
    decayed = {
        "blocks/gain": bool(jnp.any(updates["blocks"]["gain"] != 0)),
        "blocks/fc/kernel": bool(jnp.any(updates["blocks"]["fc"]["kernel"] != 0)),
    }
    assert report_says(GAIN_PARAMS, mask, stacked={"blocks": 1}) == decayed
