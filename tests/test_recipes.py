"""goyal_sgd: against optax parts, in TrainState and nnx.Optimizer, MultiSteps, bf16,
an orbax checkpoint resumed in a fresh process, and an 8-device data-parallel step."""

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

# A short Goyal run: peak 0.1 * 1024 / 256 = 0.4, warmup 5 epochs of 2 steps (W = 10),
# milestones at epochs 7 and 9 (steps 14 and 18): 20 steps cross every phase.
CONFIG = dict(batch_size=1024, steps_per_epoch=2, milestones=(7, 9))
PEAK, W = 0.4, 10


def reference_lr(t, warmup="gradual"):
    """Goyal et al.'s rate at step t, written plainly."""
    if warmup != "none" and t < W:
        return 0.1 + (PEAK - 0.1) * t / W if warmup == "gradual" else 0.1
    return PEAK * 0.1 ** ((t >= 14) + (t >= 18))


def optax_schedule(warmup):
    """The same schedule from optax's own parts."""
    if warmup == "none":
        return optax.piecewise_constant_schedule(PEAK, {14: 0.1, 18: 0.1})
    first = (
        optax.linear_schedule(0.1, PEAK, W)
        if warmup == "gradual"
        else optax.constant_schedule(0.1)
    )
    after = optax.piecewise_constant_schedule(PEAK, {14 - W: 0.1, 18 - W: 0.1})
    return optax.join_schedules([first, after], [W])


X = jnp.linspace(-1.0, 1.0, 2 * 5 * 5).reshape(2, 5, 5, 1)


def mlp_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "dense": {"kernel": jax.random.normal(k1, (4, 3)), "bias": jnp.zeros(3)},
        "norm": {"scale": jnp.ones(3), "bias": jnp.zeros(3)},
        "out": {"kernel": jax.random.normal(k2, (3, 2)), "bias": jnp.zeros(2)},
    }


HAND_MASK = {
    "dense": {"kernel": True, "bias": False},
    "norm": {"scale": False, "bias": False},
    "out": {"kernel": True, "bias": False},
}


@pytest.mark.parametrize("schedule_from", ["goyal_schedule", "optax_parts"])
@pytest.mark.parametrize(
    ("warmup", "nesterov", "momentum"),
    [
        ("gradual", False, 0.9),
        ("gradual", True, 0.9),
        ("constant", False, 0.5),
        ("none", False, 0.0),
    ],
)
def test_equals_chain_built_from_optax_parts_over_20_steps(
    warmup, nesterov, momentum, schedule_from
):
    kwargs = dict(momentum=momentum, nesterov=nesterov, weight_decay=1e-2)
    tx = ow.goyal_sgd(**CONFIG, warmup=warmup, **kwargs)
    if schedule_from == "goyal_schedule":
        schedule = ow.goyal_schedule(**CONFIG, warmup=warmup)
        atol = 0.0
    else:
        # optax's linear_schedule rounds differently in the last bit, and an update
        # that cancels to near 0 magnifies that: compare to the leaf's scale.
        schedule = optax_schedule(warmup)
        atol = 1e-6
    by_hand = optax.chain(
        optax.masked(optax.add_decayed_weights(1e-2), HAND_MASK),
        optax.inject_hyperparams(optax.sgd)(
            learning_rate=schedule, momentum=momentum, nesterov=nesterov
        ),
    )
    params = ref_params = mlp_params()
    state, ref_state = tx.init(params), by_hand.init(params)
    update, ref_update = jax.jit(tx.update), jax.jit(by_hand.update)
    for t in range(20):
        key = jax.random.key(t)
        grads = jax.tree.map(lambda p, k=key: jax.random.normal(k, p.shape), params)
        updates, state = update(grads, state, params)
        ref_updates, ref_state = ref_update(grads, ref_state, ref_params)
        for u, ref in zip(
            jax.tree.leaves(updates), jax.tree.leaves(ref_updates), strict=True
        ):
            scale = float(jnp.max(jnp.abs(ref)))
            np.testing.assert_allclose(u, ref, rtol=1e-6, atol=atol * scale)
        params = optax.apply_updates(params, updates)
        ref_params = optax.apply_updates(ref_params, ref_updates)
        np.testing.assert_allclose(
            ow.current_lr(state), reference_lr(t, warmup), rtol=1e-6
        )
    chex.assert_trees_all_close(params, ref_params, rtol=1e-6, atol=atol)


def test_jit_equals_eager_without_retracing():
    tx = ow.goyal_sgd(**CONFIG)
    params = mlp_params()
    grads = jax.tree.map(jnp.ones_like, params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def jitted(state):
        return tx.update(grads, state, params)

    s_eager = s_jit = tx.init(params)
    for _ in range(12):
        u_eager, s_eager = tx.update(grads, s_eager, params)
        u_jit, s_jit = jitted(s_jit)
        chex.assert_trees_all_close(u_eager, u_jit, rtol=1e-6)


def shrink_factors(steps, momentum=0.0, weight_decay=1e-2):
    return [1.0 - reference_lr(t) * weight_decay for t in range(steps)]


def test_train_state_zero_grads_shrink_kernels_only():
    variables = LinenNet().init(jax.random.key(0), X)
    tx = ow.goyal_sgd(**CONFIG, momentum=0.0, weight_decay=1e-2)
    state = train_state.TrainState.create(
        apply_fn=LinenNet().apply, params=variables["params"], tx=tx
    )
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    apply = jax.jit(lambda s: s.apply_gradients(grads=zeros))
    for factor in shrink_factors(12):
        new = apply(state)
        for layer in ("Conv_0", "Dense_0"):
            np.testing.assert_allclose(
                new.params[layer]["kernel"],
                state.params[layer]["kernel"] * factor,
                rtol=1e-6,
            )
            np.testing.assert_array_equal(
                new.params[layer]["bias"], state.params[layer]["bias"]
            )
        chex.assert_trees_all_equal(
            new.params["BatchNorm_0"], state.params["BatchNorm_0"]
        )
        state = new


def test_nnx_optimizer_zero_grads_shrink_kernels_only():
    model = NnxNet(nnx.Rngs(0))
    model(X)  # one forward pass so that the batch statistics are not the init ones
    opt = nnx.Optimizer(
        model, ow.goyal_sgd(**CONFIG, momentum=0.0, weight_decay=1e-2), wrt=nnx.Param
    )

    @nnx.jit
    def zero_step(model, opt):
        opt.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))

    for t, factor in enumerate(shrink_factors(12)):
        before = nnx.clone(model)
        zero_step(model, opt)
        for layer in ("Conv_0", "Dense_0"):
            old, new = getattr(before, layer), getattr(model, layer)
            np.testing.assert_allclose(
                new.kernel[...], old.kernel[...] * factor, rtol=1e-6
            )
            np.testing.assert_array_equal(new.bias[...], old.bias[...])
        for name in ("scale", "bias", "mean", "var"):
            now, then = (
                getattr(model.BatchNorm_0, name),
                getattr(before.BatchNorm_0, name),
            )
            np.testing.assert_array_equal(now[...], then[...])
        np.testing.assert_allclose(ow.current_lr(opt), reference_lr(t), rtol=1e-6)
    assert opt.step[...].dtype == jnp.uint32 and int(opt.step[...]) == 12


def test_nnx_optimizer_real_train_step():
    model = NnxNet(nnx.Rngs(0))
    opt = nnx.Optimizer(model, ow.goyal_sgd(**CONFIG), wrt=nnx.Param)
    labels = jnp.array([0, 2])

    @nnx.jit
    def train_step(model, opt):
        def loss_fn(model):
            logits = model(X)
            return optax.softmax_cross_entropy_with_integer_labels(
                logits, labels
            ).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(train_step(model, opt)) for _ in range(15)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_first_step_with_momentum_shrinks_by_one_minus_eta_lambda():
    params = mlp_params()
    tx = ow.goyal_sgd(**CONFIG, weight_decay=1e-2)  # momentum 0.9
    updates, _ = tx.update(
        jax.tree.map(jnp.zeros_like, params), tx.init(params), params
    )
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(
        new["dense"]["kernel"], params["dense"]["kernel"] * (1 - 0.1 * 1e-2), rtol=1e-6
    )
    chex.assert_trees_all_equal(new["norm"], params["norm"])


def test_multisteps_schedule_counts_optimizer_steps():
    k = 3
    tx = optax.MultiSteps(ow.goyal_sgd(**CONFIG), every_k_schedule=k)
    plain = ow.goyal_sgd(**CONFIG)
    params = ref_params = mlp_params()
    state, ref_state = tx.init(params), plain.init(params)

    @jax.jit
    def micro_step(params, state, key):
        grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape), params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, grads

    @jax.jit
    def plain_step(params, state, grads):
        updates, state = plain.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for step in range(12):
        micro = []
        for i in range(k):
            params, state, grads = micro_step(
                params, state, jax.random.key(k * step + i)
            )
            micro.append(grads)
        mean = jax.tree.map(lambda *g: sum(g) / k, *micro)
        ref_params, ref_state = plain_step(ref_params, ref_state, mean)
        # The (step + 1)-th optimizer update used the schedule at count `step`.
        np.testing.assert_allclose(ow.current_lr(state), reference_lr(step), rtol=1e-6)
    chex.assert_trees_all_close(params, ref_params, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_updates_keep_their_dtype(dtype):
    params = jax.tree.map(lambda p: p.astype(dtype), mlp_params())
    grads = jax.tree.map(jnp.ones_like, params)
    tx = ow.goyal_sgd(**CONFIG, weight_decay=lambda t: 1e-4 * jnp.ones((), jnp.float32))
    state = tx.init(params)
    for _ in range(3):
        updates, state = jax.jit(tx.update)(grads, state, params)
        assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(dtype)}
    trace = optax.tree.get(state, "trace")
    assert {t.dtype for t in jax.tree.leaves(trace)} == {jnp.dtype(dtype)}
    assert ow.current_lr(state).dtype == jnp.float32
    # What the cast is for: optax's inject_hyperparams alone returns float32.
    raw = optax.inject_hyperparams(optax.sgd)(learning_rate=optax_schedule("gradual"))
    raw_updates, _ = raw.update(grads, raw.init(params), params)
    assert {u.dtype for u in jax.tree.leaves(raw_updates)} == {jnp.dtype("float32")}


def test_nnx_bf16_model_updates_stay_bf16():
    model = NnxNet(nnx.Rngs(0), dtype=jnp.bfloat16)
    opt = nnx.Optimizer(model, ow.goyal_sgd(**CONFIG), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, opt):
        grads = nnx.grad(lambda m: m(X.astype(jnp.bfloat16)).sum())(model)
        return opt.update(model, grads)

    updates = train_step(model, opt)
    assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(jnp.bfloat16)}
    assert model.Conv_0.kernel[...].dtype == jnp.bfloat16


@pytest.mark.parametrize("momentum", [1.0, -0.1, float("nan"), 1.5])
def test_momentum_outside_unit_interval_raises(momentum):
    with pytest.raises(ValueError, match="momentum"):
        ow.goyal_sgd(**CONFIG, momentum=momentum)


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("weight_decay", -1e-4),
        ("weight_decay", float("nan")),
        ("batch_size", 0),
        ("steps_per_epoch", 0),
        ("warmup", "slow"),
        ("base_lr", -0.1),
    ],
)
def test_bad_arguments_name_themselves(argument, value):
    kwargs = {**CONFIG, argument: value}
    with pytest.raises(ValueError, match=argument):
        ow.goyal_sgd(**kwargs)


def run_script(source, *args, env=None):
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


CHECKPOINT_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np, optax
import orbax.checkpoint as ocp
import optax_warmup as ow

mode, directory, out = sys.argv[1:4]
TOTAL, SAVE_AT = 14, 4  # warmup is 10 steps: saved mid-warmup
tx = ow.goyal_sgd(batch_size=1024, steps_per_epoch=2, milestones=(6,))

def init_params():
    key = jax.random.key(0)
    return {"kernel": jax.random.normal(key, (4, 3)), "bias": jnp.zeros(3)}

@jax.jit
def step(params, opt_state, t):
    x = jax.random.normal(jax.random.fold_in(jax.random.key(1), t), (8, 4))
    loss = lambda p: jnp.mean(jnp.tanh(x @ p["kernel"] + p["bias"]) ** 2)
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

checkpointer = ocp.StandardCheckpointer()
if mode == "first":
    params = init_params()
    opt_state, start = tx.init(params), 0
else:
    target = jax.eval_shape(lambda: {"params": init_params(),
                                     "opt_state": tx.init(init_params())})
    restored = checkpointer.restore(directory, target)
    params, opt_state, start = restored["params"], restored["opt_state"], SAVE_AT
lrs = []
for t in range(start, TOTAL):
    if mode == "first" and t == SAVE_AT:
        checkpointer.save(directory, {"params": params, "opt_state": opt_state})
        checkpointer.wait_until_finished()
    params, opt_state = step(params, opt_state, t)
    lrs.append(float(ow.current_lr(opt_state)))
np.savez(out, lrs=np.asarray(lrs), count=np.asarray(opt_state.count),
         **{k: np.asarray(v) for k, v in params.items()})
"""


@pytest.mark.slow
def test_orbax_checkpoint_mid_warmup_resumes_identically_in_fresh_process(tmp_path):
    directory = tmp_path / "checkpoint"
    run_script(CHECKPOINT_SCRIPT, "first", directory, tmp_path / "first.npz")
    run_script(CHECKPOINT_SCRIPT, "resume", directory, tmp_path / "resumed.npz")
    first = np.load(tmp_path / "first.npz")
    resumed = np.load(tmp_path / "resumed.npz")
    np.testing.assert_array_equal(first["lrs"][4:], resumed["lrs"])
    np.testing.assert_allclose(resumed["lrs"][0], 0.1 + 0.3 * 4 / 10, rtol=1e-6)
    assert int(first["count"]) == int(resumed["count"]) == 14
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(first[name], resumed[name])


MESH_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, optax
import flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P
import optax_warmup as ow

assert jax.device_count() == 8, jax.devices()

class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=False)(x))
        return nn.Dense(4)(x.mean((1, 2)))

tx = ow.goyal_sgd(batch_size=32, steps_per_epoch=4, warmup_epochs=1, milestones=(2,))
x = jax.random.normal(jax.random.key(1), (32, 6, 6, 3))
y = jax.random.randint(jax.random.key(2), (32,), 0, 4)
variables = Net().init(jax.random.key(0), x[:2])

def train_step(params, batch_stats, opt_state, x, y):
    def loss_fn(params):
        logits, new = Net().apply({"params": params, "batch_stats": batch_stats}, x,
                                  mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, new["batch_stats"]
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state

def run(shard):
    step = jax.jit(train_step)
    carry = (variables["params"], variables["batch_stats"],
             tx.init(variables["params"]))
    bx, by = x, y
    if shard:
        mesh = jax.make_mesh((8,), ("data",))
        carry = jax.device_put(carry, NamedSharding(mesh, P()))
        bx = jax.device_put(x, NamedSharding(mesh, P("data")))
        by = jax.device_put(y, NamedSharding(mesh, P("data")))
        assert len(bx.sharding.device_set) == 8
        assert bx.addressable_shards[0].data.shape == (4, 6, 6, 3)
    for _ in range(6):
        carry = step(*carry, bx, by)
    return carry

single, sharded = run(False), run(True)
assert len(jax.tree.leaves(sharded[0])[0].sharding.device_set) == 8
for a, b in zip(jax.tree.leaves(single[:2]), jax.tree.leaves(sharded[:2])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(ow.current_lr(single[2]), ow.current_lr(sharded[2]))
print("ok")
"""


@pytest.mark.slow
def test_data_parallel_step_on_8_device_mesh_equals_one_device():
    result = run_script(
        MESH_SCRIPT,
        env={
            "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
            "JAX_PLATFORMS": "cpu",
        },
    )
    assert result.stdout.strip().endswith("ok")
