"""The recipes sgd, lars, lamb and adamw: each against the optax construct that does
the same thing, step for step; LARS's momentum correction; per-layer trust ratios
of stacked layers; and the JAX contract for every recipe."""

import functools
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _nets import LinenNet, NnxNet
from flax import nnx
from flax.training import train_state

import optax_warmup as ow

ROOT = Path(__file__).resolve().parents[1]

# A tree with kernels, biases and BatchNorm parameters, and its mask written by hand.
MASK = {
    "conv": {"kernel": True, "bias": False},
    "bn": {"scale": False, "bias": False},
    "out": {"kernel": True, "bias": False},
}
SCHEDULE = ow.wsd_schedule(0.5, warmup_steps=5, stable_steps=8, decay_steps=5)


def make_params(dtype=jnp.float32):
    k = jax.random.split(jax.random.key(0), 4)
    params = {
        "conv": {"kernel": jax.random.normal(k[0], (3, 3, 2, 4)), "bias": jnp.zeros(4)},
        "bn": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
        "out": {"kernel": jax.random.normal(k[1], (4, 3)), "bias": jnp.full(3, 0.1)},
    }
    return jax.tree.map(lambda p: p.astype(dtype), params)


def random_grads(params, t):
    key = jax.random.key(100 + t)
    return jax.tree.map(lambda p: jax.random.normal(key, p.shape, p.dtype), params)


def run(tx, params, steps=20):
    """Updates and current rates of ``steps`` jitted steps with random gradients."""
    state = tx.init(params)
    update = jax.jit(tx.update)
    history = []
    for t in range(steps):
        updates, state = update(random_grads(params, t), state, params)
        params = optax.apply_updates(params, updates)
        history.append(updates)
    return params, state, history


def assert_same_steps(tx, reference, params=None, rtol=1e-6, atol=1e-7):
    params = make_params() if params is None else params
    ours, _, ours_updates = run(tx, params)
    theirs, _, their_updates = run(reference, params)
    for a, b in zip(ours_updates, their_updates, strict=True):
        chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)
    chex.assert_trees_all_close(ours, theirs, rtol=rtol, atol=atol)


# Each recipe against optax, over 20 steps with a schedule crossing every phase.


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_equals_optax_sgd_after_masked_decay(nesterov):
    tx = ow.sgd(SCHEDULE, momentum=0.8, nesterov=nesterov, weight_decay=1e-2)
    reference = optax.chain(
        optax.masked(optax.add_decayed_weights(1e-2), MASK),
        optax.sgd(SCHEDULE, momentum=0.8, nesterov=nesterov),
    )
    assert_same_steps(tx, reference)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("mask", ["default", None])
def test_lars_equals_optax_lars_with_the_same_masks(mask, nesterov):
    kwargs = dict(weight_decay=1e-2, momentum=0.9, nesterov=nesterov)
    if mask == "default":
        tx = ow.lars(SCHEDULE, trust_coefficient=0.02, **kwargs)
        masks = dict(weight_decay_mask=MASK, trust_ratio_mask=MASK)
    else:  # None: every leaf, optax's default
        tx = ow.lars(SCHEDULE, trust_coefficient=0.02, mask=None, **kwargs)
        masks = {}
    reference = optax.lars(SCHEDULE, trust_coefficient=0.02, **kwargs, **masks)
    assert_same_steps(tx, reference)


def test_lars_leaves_outside_the_mask_get_plain_momentum_sgd():
    params = make_params()
    _, _, ours = run(ow.lars(0.3, weight_decay=1e-2, trust_coefficient=0.02), params)
    plain = optax.sgd(0.3, momentum=0.9)
    _, _, reference = run(plain, params)
    for a, b in zip(ours, reference, strict=True):
        # The same numbers; the rate multiplies before or after the velocity.
        for name in ("bias", "scale"):
            np.testing.assert_allclose(a["bn"][name], b["bn"][name], atol=1e-6)
        np.testing.assert_allclose(a["out"]["bias"], b["out"]["bias"], atol=1e-6)


def test_lamb_equals_the_optax_chain_with_a_masked_trust_ratio():
    tx = ow.lamb(SCHEDULE, weight_decay=0.05)
    reference = optax.chain(
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-6),
        optax.add_decayed_weights(0.05, mask=MASK),
        optax.masked(optax.scale_by_trust_ratio(), MASK),
        optax.scale_by_learning_rate(SCHEDULE),
    )
    # Adam's sqrt and division fuse differently in the two programs: a few ulps
    # per step, over 20 steps.
    assert_same_steps(tx, reference, rtol=1e-5, atol=1e-6)
    # With mask=None it is optax.lamb, whose trust ratio cannot be masked.
    everything = ow.lamb(SCHEDULE, weight_decay=0.05, mask=None)
    assert_same_steps(
        everything, optax.lamb(SCHEDULE, weight_decay=0.05), rtol=1e-5, atol=1e-6
    )


def test_adamw_equals_optax_adamw_with_the_mask():
    tx = ow.adamw(SCHEDULE, b1=0.8, b2=0.99, eps=1e-7, weight_decay=0.1)
    reference = optax.adamw(
        SCHEDULE, b1=0.8, b2=0.99, eps=1e-7, weight_decay=0.1, mask=MASK
    )
    assert_same_steps(tx, reference, rtol=1e-5)


# LARS's momentum correction (Goyal et al. section 3, remark 2).


def test_momentum_correction_shrinks_the_next_update_tenfold_at_a_milestone():
    params = {"kernel": jnp.full((2, 2), 2.0)}
    drop = ow.step_decay_schedule(1.0, [5], 0.1)  # ×0.1 at step 5

    def updates(schedule, correction):
        tx = ow.lars(schedule, weight_decay=0.0, momentum_correction=correction)
        state, out = tx.init(params), []
        for t in range(7):
            grads = {"kernel": jnp.full((2, 2), 1.0 + t)}
            update, state = tx.update(grads, state, params)
            out.append(float(update["kernel"][0, 0]))
        return np.array(out)

    constant = updates(1.0, True)
    corrected, uncorrected = updates(drop, True), updates(drop, False)
    np.testing.assert_allclose(corrected[:5], constant[:5], rtol=1e-6)
    np.testing.assert_allclose(corrected[5:], 0.1 * constant[5:], rtol=1e-5)
    # Without it the old velocity carries the old rate: far more than a tenth.
    assert abs(uncorrected[5]) > 5 * abs(0.1 * constant[5])
    np.testing.assert_allclose(uncorrected[:5], constant[:5], rtol=1e-6)


def test_momentum_correction_is_one_at_the_first_step_and_after_a_zero_rate():
    params = {"kernel": jnp.ones((2, 2))}
    warm = ow.warmup_schedule(1.0, 3)  # 0 at step 0
    tx = ow.lars(warm, weight_decay=0.0, momentum_correction=True)
    state = tx.init(params)
    for _ in range(5):
        update, state = tx.update({"kernel": jnp.ones((2, 2))}, state, params)
        assert np.all(np.isfinite(update["kernel"]))


# Stacked layers: per-layer trust ratios (and masks) equal the unstacked layers.


def layer(key):
    k1, k2 = jax.random.split(key)
    return {
        "fc": {"kernel": jax.random.normal(k1, (6, 6)), "bias": jnp.zeros(6) + 0.1},
        "ln": {"scale": 1.0 + 0.1 * jax.random.normal(k2, (6,)), "bias": jnp.zeros(6)},
    }


@pytest.mark.parametrize("recipe", ["lars", "lamb"])
def test_stacked_layers_train_as_the_same_layers_unstacked(recipe):
    layers = [layer(k) for k in jax.random.split(jax.random.key(3), 4)]
    unstacked = {f"block{i}": p for i, p in enumerate(layers)}
    stacked = {"blocks": jax.tree.map(lambda *x: jnp.stack(x), *layers)}
    make = getattr(ow, recipe)
    kwargs = dict(weight_decay=0.01)
    tx_unstacked = make(0.1, **kwargs)
    tx_stacked = make(0.1, stacked={"blocks": 1}, **kwargs)
    tx_whole = make(0.1, **kwargs)  # one norm over all layers: what optax does
    s_unstacked, s_stacked = tx_unstacked.init(unstacked), tx_stacked.init(stacked)
    s_whole = tx_whole.init(stacked)
    for t in range(10):
        g_layers = [random_grads(lay, 10 * t + i) for i, lay in enumerate(layers)]
        g_unstacked = {f"block{i}": g for i, g in enumerate(g_layers)}
        g_stacked = {"blocks": jax.tree.map(lambda *x: jnp.stack(x), *g_layers)}
        u1, s_unstacked = tx_unstacked.update(g_unstacked, s_unstacked, unstacked)
        u2, s_stacked = tx_stacked.update(g_stacked, s_stacked, stacked)
        u3, s_whole = tx_whole.update(g_stacked, s_whole, stacked)
        restacked = jax.tree.map(lambda *x: jnp.stack(x), *u1.values())
        chex.assert_trees_all_close(restacked, u2["blocks"], rtol=1e-5, atol=1e-7)
        unstacked = optax.apply_updates(unstacked, u1)
        stacked = optax.apply_updates(stacked, u2)
        layers = list(unstacked.values())
    # Without the declaration the kernels share one norm and the updates differ.
    assert not np.allclose(u3["blocks"]["fc"]["kernel"], u2["blocks"]["fc"]["kernel"])
    # The stacked biases and norm parameters were never decayed nor trust-scaled.
    mask = ow.decay_mask(stacked, stacked={"blocks": 1})
    assert not any(jax.tree.leaves(mask["blocks"]["ln"]))


def test_stacked_declaration_errors_name_the_pattern():
    params = {"blocks": layer(jax.random.key(0))}
    with pytest.raises(ValueError, match="'blockz'"):
        ow.lars(0.1, stacked={"blockz": 1}).init(params)
    with pytest.raises(ValueError, match=r"stacked\['blocks'\]"):
        ow.lars(0.1, stacked={"blocks": 0})
    with pytest.raises(ValueError, match="3 stacked axes"):
        ow.decay_mask(params, stacked={"blocks": 3})
    with pytest.raises(TypeError, match="stacked"):
        ow.decay_mask(params, stacked=1)


# The contract, for every recipe.

RECIPES = {
    "sgd": lambda lr, **kw: ow.sgd(lr, **kw),
    "lars": lambda lr, **kw: ow.lars(lr, **kw),
    "lamb": lambda lr, **kw: ow.lamb(lr, **kw),
    "adamw": lambda lr, **kw: ow.adamw(lr, **kw),
}


@pytest.mark.parametrize("name", RECIPES)
def test_current_lr_reads_every_recipe_at_every_step(name):
    tx = RECIPES[name](SCHEDULE)
    params = make_params()
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(20):
        _, state = update(random_grads(params, t), state, params)
        np.testing.assert_allclose(ow.current_lr(state), SCHEDULE(t), rtol=1e-6)
    multi = optax.MultiSteps(tx, every_k_schedule=2)
    state = multi.init(params)
    update = jax.jit(multi.update)  # eager, its lax.cond compiles at every step
    for t in range(6):
        _, state = update(random_grads(params, t), state, params)
    np.testing.assert_allclose(ow.current_lr(state), SCHEDULE(2), rtol=1e-6)


@pytest.mark.parametrize("name", RECIPES)
def test_jit_equals_eager_without_retracing(name):
    chex.clear_trace_counter()  # the counter is kept per code object
    tx = RECIPES[name](SCHEDULE)
    params = make_params()
    state_jit = state_eager = tx.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def update(grads, state, params):
        return tx.update(grads, state, params)

    for t in range(5):
        grads = random_grads(params, t)
        u_jit, state_jit = update(grads, state_jit, params)
        u_eager, state_eager = tx.update(grads, state_eager, params)
        # XLA fuses the jitted step: a few ulps apart from op-by-op execution.
        chex.assert_trees_all_close(u_jit, u_eager, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", RECIPES)
def test_vmap_over_the_learning_rate_is_a_sweep_in_one_program(name):
    params, grads = make_params(), random_grads(make_params(), 0)
    rates = jnp.array([0.05, 0.1, 0.4])

    def first_update(lr):
        tx = RECIPES[name](lr)
        return tx.update(grads, tx.init(params), params)[0]

    swept = jax.vmap(first_update)(rates)
    for i, lr in enumerate(rates):
        one = first_update(float(lr))
        chex.assert_trees_all_close(
            jax.tree.map(lambda x, i=i: x[i], swept), one, rtol=1e-6, atol=1e-8
        )


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_params_get_low_precision_updates(name, dtype):
    params = make_params(dtype)
    tx = RECIPES[name](SCHEDULE)
    state = tx.init(params)
    for t in range(3):
        updates, state = jax.jit(tx.update)(random_grads(params, t), state, params)
        assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(dtype)}
        assert all(np.all(np.isfinite(np.float32(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", RECIPES)
def test_default_mask_in_nnx_optimizer_and_train_state(name):
    # Zero gradients: only weight decay moves a parameter, so kernels move and
    # BatchNorm parameters and biases stay exactly where they are.
    x = jnp.ones((2, 5, 5, 1))
    model = NnxNet(nnx.Rngs(0))
    opt = nnx.Optimizer(model, RECIPES[name](0.1, weight_decay=0.5), wrt=nnx.Param)
    before = nnx.clone(nnx.state(model, nnx.Param))
    zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    nnx.jit(lambda opt, model, g: opt.update(model, g))(opt, model, zeros)
    after = nnx.state(model, nnx.Param)
    for module in ("Conv_0", "BatchNorm_0", "Dense_0"):
        for leaf in ("bias", "scale"):
            if leaf in after[module]:
                np.testing.assert_array_equal(
                    after[module][leaf][...], before[module][leaf][...]
                )
    assert not np.allclose(
        after["Conv_0"]["kernel"][...], before["Conv_0"]["kernel"][...]
    )
    np.testing.assert_allclose(ow.current_lr(opt), 0.1)

    variables = LinenNet().init(jax.random.key(0), x)
    state = train_state.TrainState.create(
        apply_fn=None,
        params=variables["params"],
        tx=RECIPES[name](0.1, weight_decay=0.5),
    )
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    new = jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, zeros)
    np.testing.assert_array_equal(
        new.params["BatchNorm_0"]["scale"], state.params["BatchNorm_0"]["scale"]
    )
    np.testing.assert_array_equal(
        new.params["Dense_0"]["bias"], state.params["Dense_0"]["bias"]
    )
    assert not np.allclose(
        new.params["Dense_0"]["kernel"], state.params["Dense_0"]["kernel"]
    )
    np.testing.assert_allclose(ow.current_lr(new), 0.1)


@pytest.mark.parametrize("name", RECIPES)
def test_params_as_nnx_state_of_variables(name):
    # The trees of nnx.split: each leaf a Param wrapper, as a user may pass them.
    _, params, _ = nnx.split(NnxNet(nnx.Rngs(0)), nnx.Param, ...)
    grads = jax.tree.map(jnp.ones_like, params)
    tx = RECIPES[name](0.1)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert jax.tree.structure(new) == jax.tree.structure(params)
    plain, plain_grads = nnx.to_pure_dict(params), nnx.to_pure_dict(grads)
    plain_updates, _ = jax.jit(tx.update)(plain_grads, tx.init(plain), plain)
    chex.assert_trees_all_close(nnx.to_pure_dict(updates), plain_updates, rtol=1e-6)


@pytest.mark.parametrize(
    ("name", "argument", "value"),
    [
        ("sgd", "learning_rate", -0.1),
        ("sgd", "learning_rate", float("nan")),
        ("sgd", "momentum", 1.0),
        ("sgd", "weight_decay", -1e-4),
        ("lars", "momentum", -0.5),
        ("lars", "trust_coefficient", 0.0),
        ("lars", "eps", -1.0),
        ("lars", "weight_decay", float("inf")),
        ("lamb", "b1", 1.0),
        ("lamb", "b2", -0.1),
        ("lamb", "eps", float("nan")),
        ("adamw", "b2", 1.5),
        ("adamw", "weight_decay", -1.0),
        ("adamw", "learning_rate", float("inf")),
    ],
)
def test_bad_arguments_name_themselves(name, argument, value):
    kwargs = {argument: value}
    lr = kwargs.pop("learning_rate", 0.1)
    with pytest.raises(ValueError, match=argument):
        RECIPES[name](lr, **kwargs)


def test_goyal_sgd_is_sgd_of_goyal_schedule_with_every_schedule_argument():
    signature = inspect.signature(ow.goyal_sgd)
    schedule_keywords = [
        p
        for p, v in inspect.signature(ow.goyal_schedule).parameters.items()
        if v.kind is v.KEYWORD_ONLY
    ]
    for name in schedule_keywords:
        assert (
            signature.parameters[name].default
            == inspect.signature(ow.goyal_schedule).parameters[name].default
        )
    assert not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    config = dict(
        batch_size=1024, steps_per_epoch=2, milestones=(7, 9), decay_factor=0.5
    )
    tx = ow.goyal_sgd(**config, weight_decay=1e-3)
    reference = ow.sgd(ow.goyal_schedule(**config), weight_decay=1e-3)
    assert_same_steps(tx, reference, rtol=0, atol=0)
    _, state, _ = run(tx, make_params(), steps=19)  # update 18: both milestones
    np.testing.assert_allclose(ow.current_lr(state), 0.4 * 0.5**2, rtol=1e-6)
    with pytest.raises(TypeError, match="warmup_epoch"):
        ow.goyal_sgd(1024, 2, warmup_epoch=3)


# Checkpoints: every recipe resumes bit-identically in a fresh process, from a
# checkpoint taken mid-warmup and from one taken mid-decay.

CHECKPOINT_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np, optax
import orbax.checkpoint as ocp
import optax_warmup as ow

mode, directory, out, save_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
TOTAL = 24
schedule = ow.wsd_schedule(0.2, warmup_steps=6, stable_steps=6, decay_steps=10)
RECIPES = {
    "sgd": ow.sgd(schedule, nesterov=True),
    "lars": ow.lars(schedule, momentum_correction=True, trust_coefficient=0.01),
    "lamb": ow.lamb(schedule),
    "adamw": ow.adamw(schedule),
    "plateau": optax.chain(ow.sgd(schedule), ow.reduce_on_plateau_after(
        6, patience=2, factor=0.5)),
}

def init_params():
    key = jax.random.key(0)
    return {"kernel": jax.random.normal(key, (4, 3)), "bias": jnp.zeros(3)}

def loss_fn(p, t):
    x = jax.random.normal(jax.random.fold_in(jax.random.key(1), t), (8, 4))
    return jnp.mean(jnp.tanh(x @ p["kernel"] + p["bias"]) ** 2)

def make_step(tx):
    @jax.jit
    def step(params, opt_state, t):
        loss, grads = jax.value_and_grad(loss_fn)(params, t)
        updates, opt_state = tx.update(grads, opt_state, params, value=loss)
        return optax.apply_updates(params, updates), opt_state
    return step

checkpointer = ocp.StandardCheckpointer()
results = {}
for name, tx in RECIPES.items():
    step, path = make_step(tx), f"{directory}/{name}"
    if mode == "first":
        params, opt_state, start = init_params(), tx.init(init_params()), 0
    else:
        target = jax.eval_shape(lambda: {"params": init_params(),
                                         "opt_state": tx.init(init_params())})
        restored = checkpointer.restore(path, target)
        params, opt_state, start = restored["params"], restored["opt_state"], save_at
    lrs = []
    for t in range(start, TOTAL):
        if mode == "first" and t == save_at:
            checkpointer.save(path, {"params": params, "opt_state": opt_state})
            checkpointer.wait_until_finished()
        params, opt_state = step(params, opt_state, t)
        lrs.append(float(ow.current_lr(opt_state)))
    results[f"{name}/lrs"] = np.asarray(lrs)
    for k, v in params.items():
        results[f"{name}/{k}"] = np.asarray(v)
np.savez(out, **results)
"""


@pytest.mark.slow
@pytest.mark.parametrize("save_at", [3, 15])  # mid-warmup, mid-decay
def test_every_recipe_resumes_bit_identically_in_a_fresh_process(tmp_path, save_at):
    def run_script(*args):
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(CHECKPOINT_SCRIPT), *map(str, args)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=600,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert result.returncode == 0, result.stderr[-4000:]

    run_script("first", tmp_path / "ckpt", tmp_path / "first.npz", save_at)
    run_script("resume", tmp_path / "ckpt", tmp_path / "resumed.npz", save_at)
    first, resumed = np.load(tmp_path / "first.npz"), np.load(tmp_path / "resumed.npz")
    for key in first.files:
        if key.endswith("/lrs"):
            np.testing.assert_array_equal(first[key][save_at:], resumed[key])
        else:
            np.testing.assert_array_equal(first[key], resumed[key])
    # The plateau's cut survived: its rate fell below the schedule's.
    assert resumed["plateau/lrs"][-1] <= resumed["sgd/lrs"][-1]


def test_plain_optax_reduce_on_plateau_chains_after_a_recipe_under_jit():
    tx = optax.chain(ow.sgd(0.1), optax.contrib.reduce_on_plateau(patience=1))
    params = make_params()
    state = tx.init(params)
    step = jax.jit(functools.partial(tx.update, params=params))
    for t in range(3):
        _, state = step(random_grads(params, t), state, value=jnp.float32(1.0))
    # optax cuts at once, at each of the two losses that did not improve.
    np.testing.assert_allclose(ow.current_lr(state), 0.1 * 0.1 * 0.1, rtol=1e-5)


# What an optax user meets: the defaults said where the name is, params only when
# needed, optax's Adam options, no buffer for momentum 0, goyal_sgd's stacked.


@pytest.mark.parametrize(
    ("name", "defaults"),
    [
        ("sgd", ["momentum 0.9", "weight decay 1e-4", "optax.sgd: neither"]),
        ("lars", ["momentum 0.9", "weight decay 1e-4", "optax.lars"]),
        ("lamb", ["weight decay 0.01", "optax.lamb"]),
        ("adamw", ["weight decay 1e-4", "optax.adamw"]),
    ],
)
def test_the_first_docstring_line_states_the_defaults(name, defaults):
    first = getattr(ow, name).__doc__.splitlines()[0]
    for words in defaults:
        assert words in first, (name, first)
    parameters = inspect.signature(getattr(ow, name)).parameters
    for words in defaults:
        if words.startswith("momentum"):
            assert parameters["momentum"].default == float(words.split()[-1])
        if words.startswith("weight decay"):
            assert parameters["weight_decay"].default == float(words.split()[-1])


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_no_params_needed_without_weight_decay(name):
    params = make_params()
    grads = random_grads(params, 0)
    tx = getattr(ow, name)(0.1, weight_decay=0.0)
    reference = {"sgd": optax.sgd(0.1, momentum=0.9), "adamw": optax.adam(0.1)}[name]
    state, ref_state = tx.init(params), reference.init(params)
    for t in range(3):
        grads = random_grads(params, t)
        updates, state = jax.jit(tx.update)(grads, state)
        ref_updates, ref_state = reference.update(grads, ref_state)
        chex.assert_trees_all_close(updates, ref_updates, rtol=1e-5, atol=1e-7)
    # With a decay, or a trust ratio, params are needed, and the error says why.
    for tx, why in (
        (getattr(ow, name)(0.1), "weight decay"),
        (ow.lars(0.1, weight_decay=0.0), "trust ratio"),
        (ow.lamb(0.1, weight_decay=0.0), "trust ratio"),
    ):
        with pytest.raises(ValueError, match=f"needs the params.*{why}"):
            tx.update(grads, tx.init(params))


@pytest.mark.parametrize("nesterov", [False, True])
def test_adamw_and_lamb_take_optax_adam_options(nesterov):
    options = dict(eps_root=1e-8, mu_dtype=jnp.bfloat16)
    tx = ow.adamw(SCHEDULE, weight_decay=0.1, nesterov=nesterov, **options)
    reference = optax.adamw(
        SCHEDULE, weight_decay=0.1, mask=MASK, nesterov=nesterov, **options
    )
    assert_same_steps(tx, reference, rtol=1e-5)
    tx = ow.lamb(SCHEDULE, weight_decay=0.05, **options)
    reference = optax.chain(
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-6, **options),
        optax.add_decayed_weights(0.05, mask=MASK),
        optax.masked(optax.scale_by_trust_ratio(), MASK),
        optax.scale_by_learning_rate(SCHEDULE),
    )
    assert_same_steps(tx, reference, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="eps_root"):
        ow.adamw(0.1, eps_root=-1.0)


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_bf16_params_keep_nu_in_bf16_as_optax_does(name):
    params = make_params(jnp.bfloat16)
    tx = getattr(ow, name)(1e-3, mu_dtype=jnp.float32)
    state = tx.init(params)
    (adam,) = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "nu"))
        if hasattr(s, "nu")
    ]
    assert {m.dtype for m in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.float32)}
    assert {v.dtype for v in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.bfloat16)}
    # What bf16 does to the second moment: 0.999 · ν rounds back to ν.
    nu = jnp.asarray(0.5, jnp.bfloat16)
    assert float(0.999 * nu) == 0.5
    # With float32 master weights (float32 params), both moments are float32.
    state = tx.init(make_params(jnp.float32))
    assert {x.dtype for x in jax.tree.leaves(state)} <= {
        jnp.dtype(jnp.float32),
        jnp.dtype(jnp.int32),
    }


def test_momentum_zero_allocates_no_trace():
    params = make_params()
    size = sum(p.size for p in jax.tree.leaves(params))
    for tx in (ow.sgd(0.1, momentum=0.0), ow.lars(0.1, momentum=0.0)):
        state = tx.init(params)
        assert sum(x.size for x in jax.tree.leaves(state)) < size
        updates, _ = tx.update(random_grads(params, 0), state, params)
        assert jax.tree.structure(updates) == jax.tree.structure(params)
    assert_same_steps(
        ow.sgd(SCHEDULE, momentum=0.0, weight_decay=1e-2),
        optax.chain(
            optax.masked(optax.add_decayed_weights(1e-2), MASK), optax.sgd(SCHEDULE)
        ),
    )
    assert_same_steps(
        ow.lars(SCHEDULE, momentum=0.0, weight_decay=1e-2),
        optax.lars(
            SCHEDULE,
            weight_decay=1e-2,
            weight_decay_mask=MASK,
            trust_ratio_mask=MASK,
            momentum=0.0,
        ),
    )


def test_goyal_sgd_forwards_stacked():
    params = {"blocks": {"gain": jnp.ones((3, 4)), "kernel": jnp.ones((3, 4, 4))}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = ow.goyal_sgd(256, 10, weight_decay=0.5, stacked={"blocks": 1})
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_array_equal(updates["blocks"]["gain"], 0.0)
    np.testing.assert_allclose(updates["blocks"]["kernel"], -0.1 * 0.5)
