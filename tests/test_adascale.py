"""adascale: the gain at its limits (as fairscale's own tests check), a numpy copy of
fairscale's arithmetic step for step, the clock and the rate, inside accumulate and
nnx.Optimizer, resume in a fresh process, and named errors. The float64 comparison
with fairscale itself is benchmarks/adascale_fairscale.py (it needs torch)."""

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
from flax import nnx

import optax_warmup as ow

ROOT = Path(__file__).resolve().parents[1]


class FairscaleCopy:
    """fairscale.optim.AdaScale's estimates, averages and gain, written plainly
    (one parameter group, debiased moving averages)."""

    def __init__(self, scale, smoothing=None):
        self.scale, self.smoothing = scale, smoothing
        self.avg = {"sqr": 1.0, "var": 0.0}
        self.biased = {"sqr": 0.0, "var": 0.0}
        self.unbias = {"sqr": 0.0, "var": 0.0}

    def observe(self, micro_grads):
        c = len(micro_grads)
        local = sum(float(g @ g) for g in micro_grads)  # Σ |g_i|²
        mean = np.mean(micro_grads, axis=0)
        total = float(mean @ mean)
        s = self.scale
        var = local * (s / c) / (c - 1) - total * s / (c - 1)
        sqr = total - var / s
        values = {"var": max(var, 1e-6), "sqr": max(sqr, 0.0)}
        f = self.smoothing if self.smoothing is not None else max(1 - c / 1000, 0)
        for k, v in values.items():
            self.biased[k] = f * self.biased[k] + (1 - f) * v
            self.unbias[k] = f * self.unbias[k] + (1 - f)
            self.avg[k] = self.biased[k] / self.unbias[k]

    def gain(self):
        var, sqr = self.avg["var"], self.avg["sqr"]
        return (var + sqr) / (var / self.scale + sqr)


def norms(micro_grads):
    micro_grads = np.asarray(micro_grads)
    mean = micro_grads.mean(0)
    return {
        "small_sq_norm": float(np.mean(np.sum(micro_grads**2, axis=1))),
        "big_sq_norm": float(mean @ mean),
    }


def test_pure_noise_gives_gain_s_and_identical_gradients_give_1():
    tx = ow.adascale(optax.sgd, reference_batch_size=16)(learning_rate=0.1)
    params = {"w": jnp.zeros(4)}
    rng = np.random.default_rng(0)
    # Pure noise: the groups' gradients cancel exactly (mean 0).
    noise = rng.normal(size=(8, 4))
    noise = np.concatenate([noise, -noise])
    state = tx.init(params)
    _, state = tx.update(
        {"w": jnp.zeros(4)}, state, **norms(noise), b_small=16, b_big=256
    )
    np.testing.assert_allclose(ow.current_gain(state), 16.0, rtol=1e-5)
    # Identical gradients: no variance (clamped to 1e-6), a gain of 1.
    same = np.tile(rng.normal(size=(1, 4)), (16, 1))
    state = tx.init(params)
    _, state = tx.update(
        {"w": jnp.asarray(same[0])}, state, **norms(same), b_small=16, b_big=256
    )
    np.testing.assert_allclose(ow.current_gain(state), 1.0, rtol=1e-5)


@pytest.mark.parametrize(("reference", "smoothing"), [(8, None), (8, 0.9), (16, 0.5)])
def test_step_for_step_equal_to_a_copy_of_fairscale(reference, smoothing):
    b_small, groups = 8, 4
    b_big = b_small * groups
    scale = b_big / reference
    schedule = optax.linear_schedule(0.2, 0.05, 10)  # of τ
    tx = ow.adascale(ow.sgd, reference_batch_size=reference, smoothing=smoothing)(
        learning_rate=schedule, momentum=0.9, weight_decay=0.0
    )
    copy = FairscaleCopy(scale, smoothing)
    rng = np.random.default_rng(1)
    w = rng.normal(size=5)
    params = {"kernel": jnp.asarray(w)}
    state = tx.init(params)
    step = jax.jit(tx.update)
    tau, velocity = 0.0, np.zeros(5)
    for t in range(12):
        signal = rng.normal(size=5) * (1.0 / (t + 1))
        micro = signal + rng.normal(size=(groups, 5)) * 0.5
        mean = micro.mean(0)
        updates, state = step(
            {"kernel": jnp.asarray(mean, jnp.float32)},
            state,
            params,
            **norms(micro),
            b_small=b_small,
            b_big=b_big,
        )
        params = optax.apply_updates(params, updates)
        copy.observe(list(micro))
        gain = copy.gain()
        rate = gain * float(schedule(tau))
        velocity = 0.9 * velocity + mean  # torch.optim.SGD, eq. (9) form
        w = w - rate * velocity
        tau += gain
        np.testing.assert_allclose(ow.current_gain(state), gain, rtol=1e-5)
        np.testing.assert_allclose(ow.adascale_progress(state), tau, rtol=1e-6)
        np.testing.assert_allclose(ow.current_lr(state), rate, rtol=1e-5)
        np.testing.assert_allclose(params["kernel"], w, rtol=1e-5, atol=1e-6)
    assert 1.0 < float(ow.current_gain(state)) <= scale


def test_inside_accumulate_from_micro_batches_along_a_ramp():
    micro = 4
    batch = ow.step_batch_size({0: 4, 8: 8, 24: 16})  # 1 group, then 2, then 4
    tx = ow.accumulate(
        ow.adascale(optax.sgd, reference_batch_size=micro)(learning_rate=0.1),
        batch_size=batch,
        micro_batch_size=micro,
    )
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    step = jax.jit(tx.update)
    rng = np.random.default_rng(2)
    grads = rng.normal(size=(14, 3)) + 1.0
    copy, tau, gains = None, 0.0, []
    i, consumed = 0, 0
    for g in grads:
        _, state = step({"w": jnp.asarray(g, jnp.float32)}, state, params)
    while True:
        groups = batch(consumed) // micro
        if i + groups > len(grads):
            break
        chunk = grads[i : i + groups]
        if groups > 1:
            copy = copy or FairscaleCopy(groups)
            copy.scale = groups
            copy.observe(list(chunk))
            gains.append(copy.gain())
        else:  # one group: no estimate, the gain of S = 1 is 1
            gains.append(1.0)
        tau += gains[-1]
        consumed += groups * micro
        i += groups
    np.testing.assert_allclose(ow.current_gain(state), gains[-1], rtol=1e-5)
    np.testing.assert_allclose(ow.adascale_progress(state), tau, rtol=1e-5)
    np.testing.assert_allclose(ow.current_lr(state), 0.1 * gains[-1], rtol=1e-5)
    assert int(ow.consumed_samples(state)) == consumed


def test_one_group_keeps_the_averages():
    tx = ow.adascale(optax.sgd, reference_batch_size=4)(learning_rate=1.0)
    state = tx.init({"w": jnp.zeros(2)})
    micro = np.array([[1.0, 0.0], [0.0, 1.0]])
    _, state = tx.update(
        {"w": jnp.asarray(micro.mean(0))}, state, **norms(micro), b_small=4, b_big=8
    )
    before = float(ow.current_gain(state))
    # A batch of one group at S = 2: the averages stay, the gain is theirs at S = 2.
    _, after = tx.update(
        {"w": jnp.ones(2)},
        state,
        small_sq_norm=5.0,
        big_sq_norm=5.0,
        b_small=8,
        b_big=8,
    )
    assert float(ow.current_gain(after)) == pytest.approx(before, rel=1e-6)
    np.testing.assert_array_equal(after.variance_sum, state.variance_sum)
    assert float(ow.adascale_progress(after)) == pytest.approx(2 * before, rel=1e-6)


def test_progress_keeps_its_precision_over_many_gains():
    tx = ow.adascale(optax.sgd, reference_batch_size=1)(learning_rate=0.1)
    state = tx.init({"w": jnp.zeros(())})
    step = jax.jit(
        lambda s: tx.update(
            {"w": jnp.zeros(())},
            s,
            small_sq_norm=2.0,
            big_sq_norm=1.0,
            b_small=1,
            b_big=3,
        )[1]
    )
    state = jax.lax.fori_loop(0, 200_000, lambda _, s: step(s), state)
    gain = float(ow.current_gain(state))
    # float32 adds would drift by ~ulp(τ) per step; whole + fraction stays exact.
    np.testing.assert_allclose(
        float(ow.adascale_progress(state)), 200_000 * gain, rtol=1e-6
    )


def test_rate_before_any_update_and_no_retrace():
    schedule = optax.linear_schedule(0.5, 0.1, 4)
    tx = ow.adascale(ow.sgd, reference_batch_size=2)(learning_rate=schedule)
    params = {"kernel": jnp.ones((2, 2))}
    state = tx.init(params)
    assert float(ow.current_lr(state)) == 0.5 and float(ow.current_gain(state)) == 1
    assert float(ow.adascale_progress(state)) == 0.0

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, b_big):
        return tx.update(
            {"kernel": jnp.ones((2, 2))},
            state,
            params,
            small_sq_norm=3.0,
            big_sq_norm=1.0,
            b_small=2,
            b_big=b_big,
        )

    for b_big in (4, 8, 16):  # traced sizes: one compilation for every batch
        _, state = step(state, jnp.int32(b_big))


def test_in_nnx_optimizer_with_accumulate():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    inner = ow.adascale(ow.sgd, reference_batch_size=2)(learning_rate=0.1, momentum=0.9)
    tx = ow.accumulate(inner, batch_size=8, micro_batch_size=2)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x):
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)

    for t in range(8):
        x = jax.random.normal(jax.random.key(t), (2, 3))
        step(model, optimizer, x)
    gain = float(ow.current_gain(optimizer))
    assert 1.0 <= gain <= 4.0
    np.testing.assert_allclose(ow.current_lr(optimizer), 0.1 * gain, rtol=1e-6)
    assert int(ow.consumed_samples(optimizer)) == 16


def test_float64_state_with_float64_params():
    with jax.enable_x64(True):
        tx = ow.adascale(optax.sgd, reference_batch_size=1)(learning_rate=0.1)
        state = tx.init({"w": jnp.zeros(2, jnp.float64)})
        _, state = tx.update(
            {"w": jnp.zeros(2, jnp.float64)},
            state,
            small_sq_norm=2.0,
            big_sq_norm=1.0,
            b_small=1,
            b_big=2,
        )
        assert state.gain.dtype == jnp.float64
        assert ow.adascale_progress(state).dtype == jnp.float64


def test_named_errors():
    with pytest.raises(ValueError, match="reference_batch_size must be an integer"):
        ow.adascale(optax.sgd, reference_batch_size=0)
    with pytest.raises(ValueError, match=r"smoothing must be in \[0.0, 1.0\)"):
        ow.adascale(optax.sgd, reference_batch_size=8, smoothing=1.0)
    with pytest.raises(ValueError, match=r"learning_rate must be >= 0\.0"):
        ow.adascale(optax.sgd, reference_batch_size=8)(learning_rate=-1.0)
    tx = ow.adascale(optax.sgd, reference_batch_size=8)(learning_rate=0.1)
    state = tx.init({"w": jnp.zeros(2)})
    with pytest.raises(TypeError, match="missing big_sq_norm, b_big"):
        tx.update({"w": jnp.zeros(2)}, state, small_sq_norm=1.0, b_small=8)
    with pytest.raises(ValueError, match="b_small=8, b_big=20"):
        tx.update(
            {"w": jnp.zeros(2)},
            state,
            small_sq_norm=1.0,
            big_sq_norm=1.0,
            b_small=8,
            b_big=20,
        )
    with pytest.raises(ValueError, match="current_gain found no AdaScaleState"):
        ow.current_gain(optax.sgd(0.1).init({"w": jnp.zeros(2)}))
    with pytest.raises(ValueError, match="adascale_progress found 2 AdaScaleStates"):
        ow.adascale_progress((state, state))


CHECKPOINT_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np, optax
import orbax.checkpoint as ocp
import optax_warmup as ow

mode, directory, out = sys.argv[1:4]
TOTAL, SAVE_AT = 24, 11
tx = ow.accumulate(
    ow.adascale(ow.sgd, reference_batch_size=2)(
        learning_rate=optax.cosine_decay_schedule(0.2, 30), momentum=0.9),
    batch_size=ow.rampup_batch_size(4, 4, 24, 12), micro_batch_size=2)

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
        checkpointer.save(directory, {"params": params, "opt_state": opt_state})
        checkpointer.wait_until_finished()
    params, opt_state = step(params, opt_state, t)
    trace.append([float(ow.current_gain(opt_state)),
                  float(ow.adascale_progress(opt_state)),
                  float(ow.current_lr(opt_state)),
                  int(ow.current_batch_size(opt_state))])
np.savez(out, trace=np.asarray(trace), **{k: np.asarray(v) for k, v in params.items()})
"""


@pytest.mark.slow
def test_orbax_checkpoint_mid_adascale_resumes_bit_identically(tmp_path):
    def run(*args):
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(CHECKPOINT_SCRIPT), *map(str, args)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert done.returncode == 0, done.stderr[-4000:]

    run("first", tmp_path / "ckpt", tmp_path / "first.npz")
    run("resume", tmp_path / "ckpt", tmp_path / "resumed.npz")
    first, resumed = np.load(tmp_path / "first.npz"), np.load(tmp_path / "resumed.npz")
    np.testing.assert_array_equal(first["trace"][11:], resumed["trace"])
    assert first["trace"][-1, 0] > 1.0  # the gain moved
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(first[name], resumed[name])


FAIRSCALE = ROOT / "benchmarks" / "adascale_fairscale.py"


@pytest.mark.slow
def test_equal_to_fairscale_in_float64_when_torch_is_installed(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("fairscale")
    done = subprocess.run(
        [sys.executable, str(FAIRSCALE), "--out", str(tmp_path / "fs.json")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    import json

    result = json.loads((tmp_path / "fs.json").read_text())
    for case in result["cases"]:
        for name, diff in case["max_relative_difference"].items():
            assert diff < 1e-12, (case["name"], name, diff)


def test_concrete_array_sizes_are_checked_and_traced_ones_compared_safely():
    tx = ow.adascale(optax.sgd, reference_batch_size=8)(learning_rate=0.1)
    state = tx.init({"w": jnp.zeros(2)})
    g = {"w": jnp.zeros(2)}
    for b_big in (jnp.int32(30), 30.0):
        with pytest.raises(ValueError, match="b_small must divide b_big"):
            tx.update(
                g, state, small_sq_norm=1.0, big_sq_norm=0.0, b_small=8, b_big=b_big
            )
    size = jnp.int32(32)
    fn = jax.jit(lambda a, b: ow.noise_scale_estimates(a, b, b_small=8, b_big=size))
    np.testing.assert_allclose(fn(3.0, 1.5), (1.0, 16.0), rtol=1e-6)


def test_current_lr_multiplies_in_factors_inside_adascale():
    def with_warmup(learning_rate):
        return optax.chain(optax.sgd(learning_rate), ow.scale_by_warmup(10))

    tx = ow.adascale(with_warmup, reference_batch_size=1)(learning_rate=0.1)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    updates, state = tx.update(
        {"w": jnp.ones(2)},
        state,
        params,
        small_sq_norm=1.0,
        big_sq_norm=1.0,
        b_small=1,
        b_big=2,
    )
    assert np.all(updates["w"] == 0)
    assert float(ow.current_lr(state)) == 0.0  # warmup factor 0 at the first update


def test_adascale_can_be_wrapped_by_inject_hyperparams():
    tx = optax.inject_hyperparams(ow.adascale(optax.sgd, reference_batch_size=8))(
        learning_rate=0.1
    )
    state = tx.init({"w": jnp.zeros(2)})
    updates, _ = tx.update(
        {"w": jnp.ones(2)},
        state,
        small_sq_norm=1.0,
        big_sq_norm=0.0,
        b_small=8,
        b_big=32,
    )
    np.testing.assert_allclose(updates["w"], -0.4, rtol=1e-6)  # gain S = 4
