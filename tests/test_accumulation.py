"""accumulate: equal to optax.MultiSteps for a constant batch, along a ramp (batches,
consumed samples, one compilation), the norms and sizes it hands on, the noise scale
for free, NaN for a batch the micro-batch does not divide, nnx/TrainState, vmap, a
mesh, an orbax checkpoint resumed mid-ramp in a fresh process, and named errors."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import optax_warmup as ow

ROOT = Path(__file__).resolve().parents[1]


def params_like():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "dense": {"kernel": jax.random.normal(k1, (4, 3)), "bias": jnp.zeros(3)},
        "out": {"kernel": jax.random.normal(k2, (3, 2)), "bias": jnp.zeros(2)},
    }


def micro_grads(i, params):
    """A deterministic micro-gradient for micro-step i."""
    key = jax.random.fold_in(jax.random.key(1), i)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef,
        [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)],
    )


class Seen(NamedTuple):
    """What the inner optimizer was handed, one row per update."""

    count: jax.Array
    rows: jax.Array  # (max updates, 6): b_small, b_big, consumed, small, big, mean[0]


def recorder(max_updates=64):
    def init(params):
        del params
        return Seen(jnp.zeros([], jnp.int32), jnp.zeros((max_updates, 6), jnp.float32))

    def update(updates, state, params=None, **extra):
        del params
        first = jax.tree.leaves(updates)[0].reshape(-1)[0]
        row = jnp.stack(
            [
                jnp.asarray(extra["b_small"], jnp.float32),
                jnp.asarray(extra["b_big"], jnp.float32),
                jnp.asarray(extra["consumed_samples"], jnp.float32),
                jnp.asarray(extra.get("small_sq_norm", jnp.nan), jnp.float32),
                jnp.asarray(extra.get("big_sq_norm", jnp.nan), jnp.float32),
                first.astype(jnp.float32),
            ]
        )
        rows = state.rows.at[state.count].set(row)
        return updates, Seen(state.count + 1, rows)

    return optax.GradientTransformationExtraArgs(init, update)


# --- a constant batch: optax.MultiSteps, update for update --------------------------


@pytest.mark.parametrize(
    "make", [lambda: optax.adam(1e-2), lambda: ow.sgd(0.1, momentum=0.9)]
)
@pytest.mark.parametrize(("dtype", "rtol"), [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_constant_batch_equals_multisteps(make, dtype, rtol):
    # The same running mean in float32 and the same inner updates; XLA compiles the
    # two programs (a lax.cond here, a masked update there) apart, so they agree to
    # an ulp or two, not bit for bit.
    params = jax.tree.map(lambda x: x.astype(dtype), params_like())
    ours = ow.accumulate(make(), batch_size=128, micro_batch_size=32)
    theirs = optax.MultiSteps(make(), every_k_schedule=4)
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    p_ours = p_theirs = params
    step_ours, step_theirs = jax.jit(ours.update), jax.jit(theirs.update)
    for i in range(14):
        g = jax.tree.map(lambda x: x.astype(dtype), micro_grads(i, params))
        u_ours, s_ours = step_ours(g, s_ours, p_ours)
        u_theirs, s_theirs = step_theirs(g, s_theirs, p_theirs)
        emitted = i % 4 == 3
        for a, b in zip(
            jax.tree.leaves(u_ours), jax.tree.leaves(u_theirs), strict=True
        ):
            assert a.dtype == b.dtype == dtype
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            assert np.any(a != 0) == emitted
            np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-7)
        p_ours = optax.apply_updates(p_ours, u_ours)
        p_theirs = optax.apply_updates(p_theirs, u_theirs)
    assert int(ow.consumed_samples(s_ours)) == 3 * 128
    assert int(s_ours.micro_step) == int(s_theirs.mini_step) == 2


# --- along a ramp ------------------------------------------------------------------


def test_along_a_ramp_batches_samples_norms_and_one_compilation():
    micro = 8
    schedule = ow.rampup_batch_size(8, 8, 40, 32)  # 16 from 14 samples, 24 from 27
    tx = ow.accumulate(recorder(), batch_size=schedule, micro_batch_size=micro)
    params = params_like()
    state = tx.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(g, state):
        return tx.update(g, state, params)

    grads = [micro_grads(i, params) for i in range(30)]
    for g in grads:
        _, state = step(g, state)
    seen = np.asarray(state.inner_state.rows)[: int(state.inner_state.count)]

    # By hand: the batch is decided from the samples consumed before each update.
    expected, consumed, i = [], 0, 0
    while True:
        batch = schedule(consumed)
        groups = batch // micro
        if i + groups > len(grads):
            break
        flat = [
            np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
            for g in grads[i : i + groups]
        ]
        mean = np.mean(flat, axis=0)
        small = np.mean([f @ f for f in flat])
        first = jax.tree.leaves(
            jax.tree.map(lambda *x: np.mean(x, 0), *grads[i : i + groups])
        )[0].ravel()[0]
        expected.append([micro, batch, consumed, small, mean @ mean, first])
        consumed += batch
        i += groups
    assert [row[1] for row in expected][:6] == [8, 8, 16, 24, 32, 32]
    np.testing.assert_allclose(seen, np.asarray(expected), rtol=2e-6)
    assert int(ow.consumed_samples(state)) == consumed
    assert int(ow.current_batch_size(state)) == schedule(consumed)
    assert int(state.micro_step) == len(grads) - i


def test_updates_are_zero_between_and_the_inner_optimizer_does_not_run():
    calls = []

    def counting(updates, state, params=None, **extra):
        del params, extra
        jax.debug.callback(lambda: calls.append(1))
        return updates, state

    inner = optax.GradientTransformationExtraArgs(lambda p: (), counting)
    tx = ow.accumulate(inner, batch_size=4, micro_batch_size=1)
    step = jax.jit(tx.update)
    state = tx.init({"w": jnp.zeros(2)})
    outputs = []
    for i in range(8):
        u, state = step({"w": jnp.full(2, float(i))}, state)
        outputs.append(float(u["w"][0]))
    jax.effects_barrier()
    assert outputs == [0, 0, 0, 1.5, 0, 0, 0, 5.5]
    assert len(calls) == 2  # lax.cond: once per update, not per micro-batch


def test_noise_scale_is_tracked_for_free_along_a_ramp():
    micro = 4
    tx = ow.accumulate(
        optax.chain(ow.track_noise_scale(decay=0.0), optax.sgd(0.1)),
        batch_size=ow.step_batch_size({0: 4, 4: 8, 12: 16}),
        micro_batch_size=micro,
    )
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    step = jax.jit(tx.update)
    grads = [
        {"w": jnp.asarray(np.random.default_rng(i).normal(size=3))} for i in range(7)
    ]
    for g in grads:
        _, state = step(g, state, params)
    # Updates: [g0] (one group: not measured), [g1 g2], [g3 g4 g5 g6].
    last = np.stack([np.asarray(g["w"]) for g in grads[3:7]])
    small = np.mean(np.sum(last**2, axis=1))
    big = np.sum(last.mean(0) ** 2)
    g2, trace_sigma = ow.noise_scale_estimates(small, big, micro, 16)
    np.testing.assert_allclose(
        ow.current_noise_scale(state), trace_sigma / g2, rtol=1e-5
    )
    assert int(state.inner_state[0].count) == 2  # the one-group update is skipped


def test_a_controller_sets_the_batch_on_the_first_micro_batch_only():
    tx = ow.accumulate(recorder(), batch_size=2, micro_batch_size=1)
    state = tx.init({"w": jnp.zeros(())})
    step = jax.jit(tx.update)
    for i, b in enumerate([3, 99, 99, 1, 2, 5]):
        _, state = step({"w": jnp.float32(i)}, state, batch_size=b)
    seen = np.asarray(state.inner_state.rows)[: int(state.inner_state.count)]
    np.testing.assert_array_equal(seen[:, 1], [3, 1, 2])
    np.testing.assert_allclose(seen[:, 5], [1.0, 3.0, 4.5])
    assert int(ow.current_batch_size(state)) == 2  # the schedule, until a controller


def test_a_batch_the_micro_batch_does_not_divide_is_nan_under_jit():
    tx = ow.accumulate(
        optax.sgd(1.0), batch_size=lambda c: jnp.int32(6), micro_batch_size=4
    )
    state = tx.init({"w": jnp.zeros(2)})
    step = jax.jit(tx.update)
    updates = []
    for _ in range(2):
        u, state = step({"w": jnp.ones(2)}, state)
        updates.append(np.asarray(u["w"]))
    assert np.all(np.isnan(updates[0])) and np.all(np.isnan(updates[1]))
    bad_zero = ow.accumulate(
        optax.sgd(1.0), batch_size=lambda c: jnp.int32(0), micro_batch_size=4
    )
    u, _ = jax.jit(bad_zero.update)(
        {"w": jnp.ones(2)}, bad_zero.init({"w": jnp.zeros(2)})
    )
    assert np.all(np.isnan(u["w"]))


def test_norms_off_hands_on_sizes_only():
    tx = ow.accumulate(recorder(), batch_size=2, micro_batch_size=1, sq_norms=False)
    state = tx.init({"w": jnp.zeros(())})
    for i in range(2):
        _, state = tx.update({"w": jnp.float32(i)}, state)
    row = np.asarray(state.inner_state.rows[0])
    assert row[1] == 2 and np.isnan(row[3]) and np.isnan(row[4])


def test_extra_args_reach_the_inner_optimizer_on_the_last_micro_batch():
    inner = optax.contrib.reduce_on_plateau(patience=0, cooldown=0, factor=0.5)
    tx = ow.accumulate(
        optax.chain(optax.sgd(1.0), inner), batch_size=2, micro_batch_size=1
    )
    state = tx.init({"w": jnp.zeros(())})
    for value in [1.0, 5.0, 2.0, 3.0]:  # updates see values 5.0 then 3.0
        _, state = tx.update({"w": jnp.float32(1.0)}, state, value=value)
    assert float(state.inner_state[1].best_value) == 3.0


# --- readers and the JAX contract --------------------------------------------------


def test_readers_through_nnx_optimizer_and_train_state():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    tx = ow.accumulate(
        ow.sgd(0.1), batch_size=ow.rampup_batch_size(2, 2, 4, 4), micro_batch_size=2
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x):
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)

    x = jnp.ones((2, 3))
    for _ in range(5):  # batches 2, 2, 4 (two micro-batches): 3 updates... 4 calls
        step(model, optimizer, x)
    assert int(ow.consumed_samples(optimizer)) == 8
    assert int(ow.current_batch_size(optimizer)) == 4
    np.testing.assert_allclose(ow.current_lr(optimizer), 0.1)

    params = {"w": jnp.ones(3)}
    state = train_state.TrainState.create(
        apply_fn=None,
        params=params,
        tx=ow.accumulate(optax.sgd(0.1), batch_size=4, micro_batch_size=2),
    )
    state = state.apply_gradients(grads={"w": jnp.ones(3)})
    assert int(ow.consumed_samples(state)) == 0 and int(state.opt_state.micro_step) == 1


def test_readers_name_what_is_missing_or_ambiguous():
    with pytest.raises(ValueError, match=r"consumed_samples found no AccumulateState"):
        ow.consumed_samples(optax.sgd(0.1).init({"w": jnp.zeros(2)}))
    tx = ow.accumulate(optax.sgd(0.1), batch_size=2, micro_batch_size=1)
    twice = (tx.init({"w": jnp.zeros(2)}),) * 2
    with pytest.raises(
        ValueError, match=r"current_batch_size found 2 AccumulateStates"
    ):
        ow.current_batch_size(twice)


def test_vmap_over_independent_states_equals_a_loop():
    tx = ow.accumulate(
        optax.adam(0.1), batch_size=ow.step_batch_size({0: 2, 4: 3}), micro_batch_size=1
    )
    params = {"w": jnp.zeros((5, 2))}
    states = jax.vmap(tx.init)(params)
    grads = jnp.asarray(np.random.default_rng(0).normal(size=(7, 5, 2)), jnp.float32)
    batched = jax.jit(jax.vmap(tx.update))
    loop = jax.jit(tx.update)
    singles = [tx.init({"w": jnp.zeros(2)}) for _ in range(5)]
    for t in range(7):
        u, states = batched({"w": grads[t]}, states)
        for k in range(5):
            uk, singles[k] = loop({"w": grads[t, k]}, singles[k])
            np.testing.assert_allclose(u["w"][k], uk["w"], rtol=1e-5, atol=1e-8)


def test_construction_errors_name_the_batch():
    with pytest.raises(ValueError, match=r"got a batch of 100 .*96 and 128"):
        ow.accumulate(optax.sgd(0.1), batch_size=100, micro_batch_size=32)
    with pytest.raises(ValueError, match="got a batch of 48"):
        ow.accumulate(
            optax.sgd(0.1),
            batch_size=ow.rampup_batch_size(32, 16, 100, 64),
            micro_batch_size=32,
        )
    with pytest.raises(ValueError, match="micro_batch_size must be an integer >= 1"):
        ow.accumulate(optax.sgd(0.1), batch_size=64, micro_batch_size=0)
    with pytest.raises(TypeError, match="micro_batch_size must be an int"):
        ow.accumulate(optax.sgd(0.1), batch_size=64, micro_batch_size=32.0)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        ow.accumulate(optax.sgd(0.1), batch_size=0, micro_batch_size=32)
    tx = ow.accumulate(optax.sgd(0.1), batch_size=64, micro_batch_size=32)
    with pytest.raises(TypeError, match="hands b_big to the inner optimizer itself"):
        tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.zeros(2)}), b_big=64)


# --- across devices and processes (subprocesses) ------------------------------------


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


MESH_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
import optax_warmup as ow

assert jax.device_count() == 8
tx = ow.accumulate(
    optax.chain(ow.track_noise_scale(), ow.sgd(0.1)),
    batch_size=ow.rampup_batch_size(32, 32, 128, 96), micro_batch_size=32)
w0 = {"kernel": jax.random.normal(jax.random.key(0), (6, 4)), "bias": jnp.zeros(4)}

def step(params, state, x, y):
    loss = lambda p: jnp.mean((jnp.tanh(x @ p["kernel"] + p["bias"]) - y) ** 2)
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

def run(shard):
    fn = jax.jit(step)
    params, state = w0, tx.init(w0)
    if shard:
        mesh = jax.make_mesh((8,), ("data",))
        params, state = jax.device_put((params, state), NamedSharding(mesh, P()))
    for t in range(12):
        k = jax.random.fold_in(jax.random.key(1), t)
        x = jax.random.normal(k, (32, 6)); y = jnp.sin(x[:, :4])
        if shard:
            x, y = jax.device_put((x, y), NamedSharding(mesh, P("data")))
        params, state = fn(params, state, x, y)
    return params, state

single, sharded = run(False), run(True)
for a, b in zip(jax.tree.leaves(single[0]), jax.tree.leaves(sharded[0])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
assert int(ow.consumed_samples(sharded[1])) == 320
assert int(ow.consumed_samples(single[1])) == 320
np.testing.assert_allclose(ow.current_noise_scale(single[1]),
                           ow.current_noise_scale(sharded[1]), rtol=1e-4)
print("ok")
"""


@pytest.mark.slow
def test_a_mesh_of_8_devices_equals_one_device():
    result = run_script(
        MESH_SCRIPT,
        env={
            "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
            "JAX_PLATFORMS": "cpu",
        },
    )
    assert result.stdout.strip().endswith("ok")


CHECKPOINT_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np, optax
import orbax.checkpoint as ocp
import optax_warmup as ow

mode, directory, out = sys.argv[1:4]
TOTAL, SAVE_AT = 23, 9  # micro-step 9: mid-ramp and mid-accumulation
tx = ow.accumulate(
    optax.chain(ow.track_noise_scale(), ow.sgd(0.1, momentum=0.9)),
    batch_size=ow.rampup_batch_size(2, 2, 12, 8), micro_batch_size=2)

def init_params():
    key = jax.random.key(0)
    return {"kernel": jax.random.normal(key, (4, 3)), "bias": jnp.zeros(3)}

@jax.jit
def step(params, opt_state, t):
    x = jax.random.normal(jax.random.fold_in(jax.random.key(1), t), (2, 4))
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
trace = []
for t in range(start, TOTAL):
    if mode == "first" and t == SAVE_AT:
        assert int(opt_state.micro_step) > 0, "not mid-accumulation"
        checkpointer.save(directory, {"params": params, "opt_state": opt_state})
        checkpointer.wait_until_finished()
    params, opt_state = step(params, opt_state, t)
    trace.append([int(ow.consumed_samples(opt_state)),
                  int(ow.current_batch_size(opt_state)),
                  float(ow.current_noise_scale(opt_state))])
np.savez(out, trace=np.asarray(trace), **{k: np.asarray(v) for k, v in params.items()})
"""


@pytest.mark.slow
def test_orbax_checkpoint_mid_ramp_resumes_bit_identically(tmp_path):
    directory = tmp_path / "checkpoint"
    run_script(CHECKPOINT_SCRIPT, "first", directory, tmp_path / "first.npz")
    run_script(CHECKPOINT_SCRIPT, "resume", directory, tmp_path / "resumed.npz")
    first, resumed = np.load(tmp_path / "first.npz"), np.load(tmp_path / "resumed.npz")
    np.testing.assert_array_equal(first["trace"][9:], resumed["trace"])
    assert first["trace"][-1, 1] == 8  # the ramp finished after the restore
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(first[name], resumed[name])


# --- a rate that follows the batch ---------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "kwargs"),
    [
        (ow.sgd, {"momentum": 0.0, "weight_decay": 0.0}),
        (ow.lars, {"momentum": 0.0, "weight_decay": 0.0}),
        (ow.lamb, {"weight_decay": 0.0}),
        (ow.adamw, {"weight_decay": 0.0}),
    ],
)
def test_every_recipe_takes_a_rate_that_follows_the_batch(recipe, kwargs):
    schedule = optax.linear_schedule(0.2, 0.1, 64)  # of consumed samples
    lr = ow.batch_scaled_rate(schedule, base_batch_size=4, rule="linear")
    batch = ow.rampup_batch_size(4, 4, 16, 12)  # 4, 8 from 8, 12 from 16
    tx = ow.accumulate(recipe(lr, **kwargs), batch_size=batch, micro_batch_size=4)
    params = {"kernel": jnp.ones((2, 3))}
    state = tx.init(params)
    np.testing.assert_allclose(ow.current_lr(state), 0.2, rtol=1e-6)  # η₀(0), b₀
    step = jax.jit(tx.update)
    rates, consumed = [], 0
    for i in range(12):
        g = {"kernel": jnp.full((2, 3), 0.1 * (i + 1))}
        _, state = step(g, state, params)
        if int(state.micro_step) == 0:
            rates.append(float(ow.current_lr(state)))
    expected = []
    for _ in rates:
        b = batch(consumed)
        expected.append(float(schedule(consumed)) * b / 4)
        consumed += b
    np.testing.assert_allclose(rates, expected, rtol=1e-6)
    assert int(ow.consumed_samples(state)) == consumed


def test_sgd_update_uses_the_scaled_rate():
    lr = ow.batch_scaled_rate(0.1, base_batch_size=2, rule="sqrt")
    tx = ow.accumulate(
        ow.sgd(lr, momentum=0.0, weight_decay=0.0), batch_size=8, micro_batch_size=2
    )
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    for _ in range(4):
        updates, state = tx.update({"w": jnp.ones(3)}, state, params)
    np.testing.assert_allclose(updates["w"], -0.1 * 2.0, rtol=1e-6)  # √(8/2) = 2


def test_a_rate_that_follows_the_batch_needs_accumulate():
    tx = ow.sgd(ow.batch_scaled_rate(0.1, rule="none"))
    params = {"w": jnp.zeros(3)}
    with pytest.raises(TypeError, match=r"wrap the optimizer in ow\.accumulate"):
        tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    updates, _ = tx.update(
        {"w": jnp.ones(3)}, tx.init(params), params, consumed_samples=0, b_big=64
    )
    assert updates["w"].shape == (3,)


def test_batch_scaled_rate_errors_name_the_argument():
    with pytest.raises(ValueError, match="base_batch_size is needed for rule='linear'"):
        ow.batch_scaled_rate(0.1)
    with pytest.raises(ValueError, match="rule must be one of"):
        ow.batch_scaled_rate(0.1, base_batch_size=32, rule="square")
    with pytest.raises(ValueError, match="base_batch_size must be an integer >= 1"):
        ow.batch_scaled_rate(0.1, base_batch_size=0)
    with pytest.raises(ValueError, match=r"learning_rate must be >= 0\.0"):
        ow.batch_scaled_rate(-0.1, base_batch_size=32)


# --- edges found in review -----------------------------------------------------------


def test_noise_scale_inside_accumulate_runs_without_jit():
    tx = ow.accumulate(
        optax.chain(ow.track_noise_scale(decay=0.0), optax.sgd(1.0)),
        batch_size=8,
        micro_batch_size=2,
    )
    params = {"w": jnp.zeros(3)}
    eager, jitted = tx.init(params), tx.init(params)
    step = jax.jit(tx.update)
    for g in np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32):
        _, eager = tx.update({"w": jnp.asarray(g)}, eager, params)
        _, jitted = step({"w": jnp.asarray(g)}, jitted, params)
    np.testing.assert_allclose(
        ow.current_noise_scale(eager), ow.current_noise_scale(jitted), rtol=1e-5
    )


def test_counts_past_2_31_samples_with_x64():
    with jax.enable_x64(True):
        tx = ow.accumulate(optax.sgd(0.1), batch_size=2**30, micro_batch_size=2**30)
        state = tx.init({"w": jnp.zeros(2)})
        assert state.consumed_samples.dtype == jnp.int64
        for _ in range(3):
            _, state = tx.update({"w": jnp.ones(2)}, state)
        assert int(ow.consumed_samples(state)) == 3 * 2**30


def test_the_controller_batch_is_an_integer_and_a_negative_one_adds_nothing():
    tx = ow.accumulate(optax.sgd(1.0), batch_size=4, micro_batch_size=2)
    params = {"w": jnp.zeros(2)}
    with pytest.raises(TypeError, match="batch_size must be an integer scalar"):
        tx.update({"w": jnp.ones(2)}, tx.init(params), params, batch_size=7.9)
    updates, state = jax.jit(tx.update)(
        {"w": jnp.ones(2)}, tx.init(params), params, batch_size=-4
    )
    assert np.all(np.isnan(updates["w"]))
    assert int(ow.consumed_samples(state)) == 0


def test_numpy_integers_are_integers():
    tx = ow.accumulate(optax.sgd(0.1), batch_size=4, micro_batch_size=np.int64(2))
    _, state = tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.zeros(2)}))
    assert int(state.micro_step) == 1


def test_a_ramp_with_more_increments_than_samples_is_accepted():
    ramp = ow.rampup_batch_size(2, 1, 2, 6)  # increments start two to a count
    assert ramp.batch_sizes == (2, 4, 6)
    assert [ramp(c) for c in range(4)] == [2, 4, 6, 6]
    ow.accumulate(optax.sgd(0.1), batch_size=ramp, micro_batch_size=2)


def test_a_batch_scaled_rate_given_to_an_optax_optimizer_says_why_it_fails():
    tx = optax.sgd(ow.batch_scaled_rate(0.1, base_batch_size=4))
    params = {"w": jnp.zeros(2)}
    with pytest.raises(TypeError, match=r"inside ow\.accumulate"):
        tx.update({"w": jnp.ones(2)}, tx.init(params), params)
