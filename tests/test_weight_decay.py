"""decay_mask, decay_report and masked_weight_decay."""

import functools
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _nets import LinenNet, NnxNet
from flax import nnx
from flax.core import freeze
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_warmup as ow

# The rank rule, written out for the models below: kernels decayed, the rest not.
EXPECTED = {
    "BatchNorm_0/bias": False,
    "BatchNorm_0/scale": False,
    "Conv_0/bias": False,
    "Conv_0/kernel": True,
    "Dense_0/bias": False,
    "Dense_0/kernel": True,
}


X = jnp.ones((2, 5, 5, 1))


def flat(tree, prefix=""):
    """{'a/b': leaf} of a tree, with a Variable as one leaf (written for the tests)."""
    leaves = jax.tree_util.tree_leaves_with_path(
        tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    out = {}
    for path, leaf in leaves:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        out["/".join(names)[len(prefix) :]] = leaf
    return out


def linen_params():
    return LinenNet().init(jax.random.key(0), X)["params"]


def test_rank_rule_on_linen_dict_and_frozendict():
    params = linen_params()
    assert isinstance(params, dict)
    mask = ow.decay_mask(params)
    assert flat(mask) == EXPECTED
    assert all(type(v) is bool for v in flat(mask).values())
    frozen_mask = ow.decay_mask(freeze(params))
    assert flat(frozen_mask) == EXPECTED
    assert jax.tree.structure(frozen_mask) == jax.tree.structure(freeze(params))


def test_same_mask_for_nnx_state_plain_arrays_and_linen():
    model = NnxNet(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    pure = nnx.as_pure(state)
    mask_wrapped, mask_pure = ow.decay_mask(state), ow.decay_mask(pure)
    assert flat(mask_wrapped) == flat(mask_pure) == EXPECTED
    assert jax.tree.structure(mask_wrapped) == jax.tree.structure(mask_pure)
    assert flat(ow.decay_mask(linen_params())) == flat(mask_pure)


def test_mask_seen_at_init_equals_mask_at_update_in_nnx_optimizer():
    seen = []

    def recording_mask(tree):
        mask = ow.decay_mask(tree)
        seen.append(mask)
        return mask

    model = NnxNet(nnx.Rngs(0))
    opt = nnx.Optimizer(
        model, ow.masked_weight_decay(1e-4, mask=recording_mask), wrt=nnx.Param
    )
    grads = nnx.grad(lambda m: m(X).sum())(model)
    opt.update(model, grads)
    assert len(seen) == 2  # once at init (Param leaves), once at update (arrays)
    assert jax.tree.structure(seen[0]) == jax.tree.structure(seen[1])
    assert flat(seen[0]) == flat(seen[1]) == EXPECTED


@pytest.mark.parametrize("form", ["wrapped", "pure", "tree_map"])
def test_mask_tree_from_nnx_state_works_in_nnx_optimizer(form):
    # The known failure: a mask built once from nnx.state crashes at the first update.
    model = NnxNet(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    mask = {
        "wrapped": lambda: ow.decay_mask(state),
        "pure": lambda: ow.decay_mask(nnx.as_pure(state)),
        "tree_map": lambda: jax.tree.map(lambda x: x.ndim > 1, state),  # Param(bool)
    }[form]()
    opt = nnx.Optimizer(model, ow.masked_weight_decay(0.5, mask=mask), wrt=nnx.Param)
    before = flat(nnx.as_pure(nnx.state(model, nnx.Param)))
    zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    updates = opt.update(model, zeros)
    for path, update in flat(updates).items():
        expected = 0.5 * before[path] if EXPECTED[path] else 0.0 * before[path]
        np.testing.assert_allclose(update, expected, rtol=1e-6)


def test_exclude_then_include():
    params = {
        "embed": {"embedding": jnp.ones((10, 4))},
        "scan": {"norm": {"scale": jnp.ones((3, 4))}, "kernel": jnp.ones((3, 4, 4))},
        "head": {"bias": jnp.ones(4)},
    }
    assert flat(ow.decay_mask(params)) == {
        "embed/embedding": True,
        "head/bias": False,
        "scan/kernel": True,
        "scan/norm/scale": False,  # named scale: a norm parameter, whatever its rank
    }
    mask = ow.decay_mask(params, exclude=[r"^embed/", r"norm/scale$"])
    assert flat(mask)["embed/embedding"] is False
    assert flat(mask)["scan/norm/scale"] is False
    assert flat(mask)["scan/kernel"] is True
    # A single string is one pattern; include wins over exclude.
    mask = ow.decay_mask(params, exclude=r"^embed/", include=("embedding", "bias"))
    assert flat(mask)["embed/embedding"] is True
    assert flat(mask)["head/bias"] is True


def test_patterns_match_the_path_without_nnx_value():
    state = nnx.state(NnxNet(nnx.Rngs(0)), nnx.Param)
    mask = ow.decay_mask(state, exclude=r"^Dense_0/kernel$")
    assert flat(mask)["Dense_0/kernel"] is False
    assert flat(mask)["Conv_0/kernel"] is True


@pytest.mark.parametrize("argument", ["exclude", "include"])
def test_pattern_that_matches_nothing_raises_naming_it(argument):
    with pytest.raises(ValueError, match=rf"{argument} pattern 'Dense_O/kernel'"):
        ow.decay_mask(linen_params(), **{argument: ["Conv", "Dense_O/kernel"]})


@pytest.mark.parametrize("argument", ["exclude", "include"])
def test_invalid_regex_raises_naming_it(argument):
    with pytest.raises(ValueError, match=rf"{argument} pattern '\(unclosed'.*regular"):
        ow.decay_mask(linen_params(), **{argument: "(unclosed"})


def test_non_string_pattern_raises():
    with pytest.raises(TypeError, match="exclude"):
        ow.decay_mask(linen_params(), exclude=[3])


def test_abstract_params_and_edges():
    abstract = jax.eval_shape(linen_params)
    assert flat(ow.decay_mask(abstract)) == EXPECTED
    assert ow.decay_mask({}) == {}
    assert ow.decay_mask({"scalar": jnp.ones(()), "tuple": (jnp.ones((2, 2)),)}) == {
        "scalar": False,
        "tuple": (True,),
    }
    # Under jit, the mask is read from shapes only and stays a tree of Python bools.
    masks = []
    jax.jit(lambda p: masks.append(ow.decay_mask(p)))(linen_params())
    assert flat(masks[0]) == EXPECTED


shapes = st.lists(st.integers(1, 3), min_size=0, max_size=4).map(tuple)


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(st.text("abcxyz", min_size=1, max_size=4), shapes, max_size=6))
def test_rank_rule_and_report_totals_property(tree_shapes):
    params = {k: np.zeros(s, np.float32) for k, s in tree_shapes.items()}
    mask = ow.decay_mask(params)
    assert mask == {k: len(s) >= 2 for k, s in tree_shapes.items()}
    report = ow.decay_report(params).splitlines()
    n_decayed = sum(int(np.prod(s)) for s in tree_shapes.values() if len(s) >= 2)
    n_total = sum(int(np.prod(s)) for s in tree_shapes.values())
    assert report[-3].split()[-2] == f"{n_decayed:,}"
    assert report[-1].split()[-2] == f"{n_total:,}"
    assert len(report) == len(tree_shapes) + 4


def test_decay_report_table():
    report = ow.decay_report(linen_params())
    lines = report.splitlines()
    assert lines[0].split() == ["path", "shape", "dtype", "decayed", "rule"]
    rows = {line.split()[0]: line for line in lines[1:7]}
    assert rows["Conv_0/kernel"].endswith("yes      rank 4")
    assert "(3, 3, 1, 4)" in rows["Conv_0/kernel"]
    assert "float32" in rows["Conv_0/kernel"]
    assert rows["BatchNorm_0/scale"].endswith("no       bias or norm")
    assert lines[-3] == "decayed:     2 leaves, 48 parameters"  # 36 + 12
    assert lines[-2] == "not decayed: 4 leaves, 15 parameters"  # 4 + 4 + 4 + 3
    assert lines[-1] == "total:       6 leaves, 63 parameters"
    # nnx state, a custom mask, and a mask that does not fit.
    state = nnx.state(NnxNet(nnx.Rngs(0)), nnx.Param)
    assert ow.decay_report(state) == report
    everything = ow.decay_report(state, mask=lambda p: jax.tree.map(lambda _: True, p))
    assert everything.splitlines()[-3] == "decayed:     6 leaves, 63 parameters"
    assert everything.splitlines()[1].endswith("yes      mask")
    excluded = ow.decay_report(
        state, mask=functools.partial(ow.decay_mask, exclude=r"^Conv_0/kernel$")
    )
    row = next(line for line in excluded.splitlines() if "Conv_0/kernel" in line)
    assert row.split()[-2:] == ["no", "exclude"]
    with pytest.raises(ValueError, match=r"first path that differs is .Dense_0/bias"):
        ow.decay_report(linen_params(), mask={"Conv_0": True, "BatchNorm_0": False})


def reference_decay(grads, params, mask, wd):
    return {k: g + wd * params[k] if mask[k] else g for k, g in grads.items()}


def test_masked_weight_decay_values_and_optax_equivalence():
    params = flat(linen_params())
    grads = {k: jnp.full_like(v, 0.5) for k, v in params.items()}
    tx = ow.masked_weight_decay(1e-2)
    updates, _ = tx.update(grads, tx.init(params), params)
    expected = reference_decay(grads, params, EXPECTED, 1e-2)
    chex.assert_trees_all_close(updates, expected, rtol=1e-7)
    by_hand = optax.masked(optax.add_decayed_weights(1e-2), EXPECTED)
    chex.assert_trees_all_close(
        updates, by_hand.update(grads, by_hand.init(params), params)[0], rtol=0
    )


def test_masked_weight_decay_schedule_counts_updates():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    grads = jax.tree.map(jnp.zeros_like, params)
    tx = ow.masked_weight_decay(lambda t: 0.1 * (jnp.asarray(t, jnp.float32) + 1))
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(4):
        updates, state = update(grads, state, params)
        np.testing.assert_allclose(updates["w"], 0.1 * (t + 1), rtol=1e-6)
        np.testing.assert_array_equal(updates["b"], 0.0)


def test_masked_weight_decay_prefix_none_and_zero():
    params = {"backbone": {"w": jnp.ones((2, 2))}, "head": {"w": jnp.ones((2, 2))}}
    grads = jax.tree.map(jnp.zeros_like, params)
    tx = ow.masked_weight_decay(1.0, mask={"backbone": False, "head": True})
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(updates["backbone"]["w"][0, 0]) == 0.0
    assert float(updates["head"]["w"][0, 0]) == 1.0
    tx = ow.masked_weight_decay(1.0, mask=None)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(updates["backbone"]["w"][0, 0]) == 1.0
    tx = ow.masked_weight_decay(0.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    chex.assert_trees_all_equal(updates, grads)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("wd", [1e-2, "array", "schedule"])
def test_masked_weight_decay_keeps_dtype(dtype, wd):
    wd = {
        "array": jnp.asarray(1e-2, jnp.float32),
        "schedule": optax.linear_schedule(1e-2, 0.0, 10),
    }.get(wd, wd)
    params = {"w": jnp.ones((2, 2), dtype), "b": jnp.ones(2, dtype)}
    tx = ow.masked_weight_decay(wd)
    updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
    assert jax.tree.map(lambda u: u.dtype, updates) == {"w": dtype, "b": dtype}


@pytest.mark.parametrize("bad", [-1e-4, float("nan"), float("inf")])
def test_bad_weight_decay_raises_naming_it(bad):
    with pytest.raises(ValueError, match="weight_decay"):
        ow.masked_weight_decay(bad)


def test_mask_structure_mismatch_names_first_path():
    params = flat(linen_params())
    missing = {k: v for k, v in EXPECTED.items() if k != "Conv_0/kernel"}
    tx = ow.masked_weight_decay(1e-4, mask=missing)
    with pytest.raises(ValueError, match=r"'Conv_0/kernel' \(in params, not in the"):
        tx.init(params)
    extra = {**EXPECTED, "Dense_1/kernel": True}
    tx = ow.masked_weight_decay(1e-4, mask=extra)
    with pytest.raises(ValueError, match=r"'Dense_1/kernel' \(in the mask, not in"):
        tx.init(params)
    # A callable mask that returns the wrong structure is caught at update too.
    tx = ow.masked_weight_decay(1e-4, mask=lambda p: {"Conv_0/kernel": True})
    with pytest.raises(ValueError, match="'BatchNorm_0/bias'"):
        tx.update(params, optax.MaskedState(optax.EmptyState()), params)


def test_inject_hyperparams_with_function_mask_is_refused_not_silent():
    params = {"w": jnp.ones((2, 2))}
    injected = optax.inject_hyperparams(ow.masked_weight_decay)
    with pytest.raises(ValueError, match=r"mask.*static_args=\('mask',\)"):
        injected(weight_decay=1e-4).init(params)
    tx = optax.inject_hyperparams(ow.masked_weight_decay, static_args=("mask",))(
        weight_decay=1e-4
    )
    updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], 1.0001, rtol=1e-6)


def test_traced_mask_raises():
    params = {"w": jnp.ones((2, 2))}

    def update(flag):
        tx = ow.masked_weight_decay(1e-4, mask={"w": flag})
        return tx.update(params, tx.init(params), params)

    with pytest.raises(ValueError, match="static"):
        jax.jit(update)(jnp.asarray(True))


def test_partial_decay_mask_in_chain_under_jit():
    params = {"embed": jnp.ones((4, 2)), "w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    mask = functools.partial(ow.decay_mask, exclude="embed")
    tx = optax.chain(ow.masked_weight_decay(0.5, mask), optax.sgd(1.0))
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["embed"], 0.0)
    np.testing.assert_array_equal(updates["b"], 0.0)
    np.testing.assert_allclose(updates["w"], -0.5)


def test_mask_none_decays_every_leaf_in_the_report_as_in_the_transform():
    params = linen_params()
    assert inspect.signature(ow.decay_report).parameters["mask"].default is (
        ow.decay_mask
    )
    assert ow.decay_report(params) == ow.decay_report(params, ow.decay_mask)
    everything = ow.decay_report(params, None).splitlines()
    assert everything[-3] == "decayed:     6 leaves, 63 parameters"
    assert all(line.split()[-2:] == ["yes", "mask"] for line in everything[1:7])
    grads = jax.tree.map(jnp.zeros_like, params)
    tx = ow.masked_weight_decay(1.0, mask=None)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert all(
        bool(jnp.all(u == p))
        for u, p in zip(*map(jax.tree.leaves, (updates, params)), strict=True)
    )


# Inside optax.multi_transform each branch sees its own leaves; a pattern is checked
# against the paths of the whole tree.


def branches(mask):
    return optax.multi_transform(
        {
            "sgd": optax.chain(ow.masked_weight_decay(0.5, mask), optax.sgd(1.0)),
            "adamw": ow.adamw(1.0, weight_decay=0.5, mask=mask),
        },
        {"conv": {"kernel": "sgd", "bias": "sgd"}, "head": {"kernel": "adamw"}},
    )


def test_a_pattern_is_checked_against_the_whole_tree_in_multi_transform():
    params = {
        "conv": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.ones(2)},
        "head": {"kernel": jnp.ones((2, 2))},
    }
    grads = jax.tree.map(jnp.zeros_like, params)
    # "conv" matches nothing in the adamw branch, only in the whole tree.
    tx = branches(functools.partial(ow.decay_mask, exclude="conv"))
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["conv"]["kernel"], 0.0)  # excluded
    np.testing.assert_array_equal(updates["conv"]["bias"], 0.0)
    np.testing.assert_allclose(updates["head"]["kernel"], -0.5)  # −η·λ·w
    tx = branches(functools.partial(ow.decay_mask, exclude="kernel"))
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert not any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates))
    # A typo matches nothing in the whole tree: refused at init.
    with pytest.raises(ValueError, match="'kernal' matches no parameter path"):
        branches(functools.partial(ow.decay_mask, exclude="kernal")).init(params)
