"""Tests of the adaptive-batch experiment (``python -m optax_warmup.demo --experiment
adaptive-batch``): each schedule's batches and rates, the noise-driven controller,
the critical batch fitted from (steps, examples) points, the analysis and report of
fake runs, and the command line. The end-to-end tests run ``--quick`` in a
subprocess, as a user would, and carry the ``slow`` marker."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_warmup as ow
from optax_warmup.demo import adaptive_batch as ab
from optax_warmup.demo import stats, training
from optax_warmup.demo.__main__ import main, parse

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROG_ERROR = "python -m optax_warmup.demo: error: "
FIGURES = ("steps_vs_examples.png", "schedules.png", "test_error.png")
QUICK = ab.EXPERIMENT.quick
N_TRAIN = 16384  # the default's training sequences


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH")) if p
    )
    return env


def _argv(out: Path, cache: Path) -> list[str]:
    return [
        "--experiment",
        "adaptive-batch",
        "--quick",
        "--no-progress",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
    ]


def _batches(schedule, n_train: int, epochs: float) -> list[int]:
    """The batch of every update, as ``ow.accumulate`` takes them (from the samples
    consumed before each), until ``epochs`` epochs of examples."""
    consumed, out = 0, []
    while consumed < epochs * n_train:
        batch = schedule if isinstance(schedule, int) else int(schedule(consumed))
        out.append(batch)
        consumed += batch
    return out


# --- each schedule's batches and rates --------------------------------------------


def test_fixed_and_adascale_batches_are_constant():
    s = ab.Settings()
    for config in ("fixed-32", "fixed-256", "adascale-256", "adascale-1024"):
        batches = _batches(s.batch_schedule(config, N_TRAIN), N_TRAIN, 12)
        assert set(batches) == {int(config.split("-")[1])}
        assert len(batches) == 12 * N_TRAIN // batches[0]
    assert s.batch_schedule("noise", N_TRAIN) == 64  # 2n before any estimate


def test_smith_grows_the_batch_at_each_milestone_and_keeps_rate_over_batch():
    s = ab.Settings()
    batches = _batches(s.batch_schedule("smith", N_TRAIN), N_TRAIN, 12)
    # 4 epochs at 32, 4 at 256, then 1024 (the cap) to the end.
    expected = [32] * (4 * N_TRAIN // 32) + [256] * (4 * N_TRAIN // 256)
    expected += [1024] * (4 * N_TRAIN // 1024)
    assert batches == expected
    steps = s.smith_steps()
    ratios = [rate / batch for batch, rate in steps]
    for before, after in itertools.pairwise(ratios):
        assert after / before == pytest.approx(0.1)  # the reference's ×0.1 decay
    assert [b for b, _ in steps] == [32, 256, 1024, 1024]
    assert [r for _, r in steps] == pytest.approx([0.1, 0.08, 0.032, 0.0032])


def test_smith_with_a_larger_cap_is_a_pure_batch_increase():
    s = ab.Settings(smith_factor=10, smith_max_batch=32_000)
    assert s.smith_steps() == [(32, 0.1), (320, 0.1), (3200, 0.1), (32000, 0.1)]


def test_ramp_adds_n_over_equal_spans_of_samples_then_holds():
    s = ab.Settings(ramp_batch=256, ramp_epochs=1.0)
    n_train = 2048
    batches = _batches(s.batch_schedule("ramp", n_train), n_train, 3)
    consumed = np.concatenate([[0], np.cumsum(batches)[:-1]])
    # 7 increments of 32, from 32 to 256, over equal spans of one epoch
    expected = [256 if c > n_train else 32 + 32 * (7 * c // n_train) for c in consumed]
    assert batches == expected
    assert batches[0] == 32 and max(batches) == 256
    assert all(b <= a for a, b in zip(batches[1:], batches, strict=False))


def test_ramp_and_noise_rates_follow_the_batch_by_the_linear_rule():
    s = ab.Settings()
    schedule = s.samples_schedule(N_TRAIN)  # the reference's, counted in samples
    rate = ow.batch_scaled_rate(schedule, base_batch_size=32, rule="linear")
    for consumed, batch, expected in [
        (0, 64, 0.2),
        (4 * N_TRAIN - 1, 1024, 3.2),
        (4 * N_TRAIN, 1024, 0.32),
        (11 * N_TRAIN, 256, 0.0008),
    ]:
        assert float(rate(consumed, batch)) == pytest.approx(expected, rel=1e-5)
    for config in ("ramp", "noise"):
        tx = s.recipe(config, N_TRAIN)
        params = {"w": jnp.zeros(2)}
        _, state = tx.update(
            {"w": jnp.ones(2)},
            tx.init(params),
            params,
            consumed_samples=4 * N_TRAIN,
            b_big=512,
        )
        assert float(ow.current_lr(state)) == pytest.approx(0.16, rel=1e-5)


def test_noise_batch_is_the_nearest_power_within_bounds_and_keeps_a_bad_estimate():
    keep = jnp.int32(256)
    cases = {
        10.0: 64,  # below 2n: 2n
        90.0: 64,
        100.0: 128,
        181.0: 128,
        182.0: 256,
        700.0: 512,
        5000.0: 1024,  # above the bound: the bound
        math.inf: 256,  # |G|² estimate 0: keep the batch
        -40.0: 256,  # |G|² estimate negative: keep
        math.nan: 256,  # before any estimate: keep
    }
    got = {b: int(ab.noise_batch(jnp.float32(b), keep, 32, 1024)) for b in cases}
    assert got == cases


def test_noise_controller_drives_accumulate_within_its_bounds():
    """A linear model with noisy targets: the batch of each update is 2n·2^j, and the
    controller reads the tracker inside accumulate."""
    s = ab.Settings(noise_max_batch=256)
    micro = s.small_batch
    tx = ow.accumulate(
        optax.chain(
            ow.track_noise_scale(decay=0.0),
            ow.track_noise_scale(decay=s.noise_decay),
            ow.sgd(0.01, weight_decay=0.0),
        ),
        batch_size=s.batch_schedule("noise", 4096),
        micro_batch_size=micro,
    )
    controller = ab._NoiseController(micro, s.noise_max_batch)
    w = jnp.zeros(4)
    state = tx.init(w)

    def loss(w, x, y):
        return 0.5 * jnp.mean((x @ w - y) ** 2)

    import jax

    @jax.jit
    def step(w, state, x, y):
        grads = jax.grad(loss)(w, x, y)
        updates, state = tx.update(grads, state, w, batch_size=controller(state))
        return optax.apply_updates(w, updates), state

    rng = np.random.default_rng(0)
    consumed = [0]
    for _ in range(120):
        x = rng.normal(size=(micro, 4)).astype(np.float32)
        y = x @ np.arange(4.0, dtype=np.float32) + 3 * rng.normal(size=micro)
        w, state = step(w, state, x, y.astype(np.float32))
        if int(state.micro_step) == 0:
            consumed.append(int(ow.consumed_samples(state)))
    batches = set(np.diff(consumed).tolist())
    assert batches <= {64, 128, 256}, batches
    assert len(batches) > 1  # it moved with the estimate


# --- the critical batch -----------------------------------------------------------


def test_fit_recovers_a_known_critical_batch_from_noisy_points():
    s_min, e_min = 400.0, 80_000.0  # B_crit = 200
    batches = np.array([32, 64, 128, 256, 512, 1024], float)
    steps = s_min + e_min / batches
    noise = np.array([1.03, 0.98, 1.02, 0.97, 1.01, 0.99])  # ±3 %, fixed
    fit = stats.fit_critical_batch(steps * noise, batches * steps * noise)
    assert fit.b_crit == pytest.approx(200.0, rel=0.05)
    assert fit.s_min == pytest.approx(s_min, rel=0.1)
    assert fit.e_min == pytest.approx(e_min, rel=0.1)


def _fake_run(config: str, seed: int, steps: float, final: float = 0.01):
    """A run whose curve crosses 5 % error at ``steps`` updates exactly (linear in
    the updates and the examples) and ends at ``final``; one whose final error is
    above 5 % never gets below 50 %."""
    batch = ab.batch_of(config) or 128
    updates = [steps / 2, steps * 3 / 2, steps * 2]
    curve = {
        "updates": updates,
        "examples": [u * batch for u in updates],
        "test_error": [0.10, 0.0 if final < 0.05 else 0.5, final],
        "batch": [batch] * 3,
        "lr": [0.1] * 3,
        "g2_sum": [1.0, 1.0, 1.0],
        "trace_sigma_sum": [100.0, 300.0, 900.0],
    }
    return {
        "config": config,
        "kind": ab.kind_of(config),
        "seed": seed,
        "steps": steps * 2,
        "examples": steps * 2 * batch,
        "diverged": False,
        "final_test_error": final,
        "train_examples": 4096,
        "curve": curve,
        "test_error": [final] * 5,
        "epoch_examples": [4096 * (i + 1) for i in range(5)],
    }


def test_critical_batch_of_fake_runs_is_the_known_one_and_b_simple_its_stretch():
    settings = ab.Settings(batches=(32, 64, 128, 256, 512, 1024))
    s_min, e_min = 100.0, 20_000.0  # B_crit = 200
    runs = [
        _fake_run(f"fixed-{b}", seed, (s_min + e_min / b) * (1 + 0.01 * seed))
        for seed in range(3)
        for b in settings.batches
    ]
    fit = ab.critical_batch(runs, settings, 0.05)
    assert fit["b_crit"] == pytest.approx(200.0, rel=0.05)
    assert fit["batches_reached"] == list(settings.batches)
    # Up to the first point at or below 5 %: Σ tr Σ / Σ |G|² = 400 / 2.
    assert fit["b_simple"] == pytest.approx(200.0)
    assert fit["ratio_mean"] == pytest.approx(1.0, rel=0.05)
    assert ab.stretch_noise_scale(runs[1]) == pytest.approx(1300 / 3)
    never = _fake_run("fixed-64", 0, 600, final=0.2)
    assert ab.stretch_noise_scale(never, 0.09) is None  # never reached


def test_summary_ratios_table_and_notes_of_fake_runs(tmp_path):
    settings = ab.Settings(batches=(32, 64, 128), adascale_batches=(256,))
    runs = []
    for seed in range(2):
        runs += [
            _fake_run("fixed-32", seed, 1000, final=0.010 + 0.001 * seed),
            _fake_run("fixed-64", seed, 600, final=0.011),
            _fake_run("fixed-128", seed, 400, final=0.2),  # never reaches 1 %
            _fake_run("smith", seed, 500, final=0.010),
            _fake_run("ramp", seed, 150, final=0.009),
            _fake_run("noise", seed, 300, final=0.3),
            _fake_run("adascale-256", seed, 200, final=0.010),
        ]
    summary = ab.summarize(runs, settings)
    rows, a = summary["rows"], summary["analysis"]
    assert a["reference_error"] == pytest.approx(0.0105)
    assert a["best_fixed"] == "fixed-64"  # fixed-128 never reaches it
    assert rows["fixed-64"]["steps_ratio"] == pytest.approx(1.0)
    assert rows["ramp"]["steps_ratio"] == pytest.approx(150 / 600, rel=0.1)
    assert rows["fixed-128"]["steps_ratio"] is None
    assert rows["noise"]["steps_to_reference"] is None
    table = ab.markdown_table(summary)
    assert "fixed kn=64 (best fixed)" in table and "not reached" in table
    assert "B_crit" in table
    text = "\n".join(ab.notes(summary))
    assert "ramp: 0.2" in text and "noise-driven: did not reach" in text
    paths = ab.plot(runs, settings, tmp_path)
    assert [p.name for p in paths] == list(FIGURES)
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in paths)


# --- the command line -------------------------------------------------------------


@pytest.fixture(scope="module")
def flag_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("adaptive-cache")


@pytest.mark.parametrize(
    ("argv", "flag", "detail"),
    [
        (["--batches", "64,128,256"], "--batches", "include the reference"),
        (["--batches", "32,128,64"], "--batches", "strictly increasing"),
        (["--batches", "32,48,64"], "--batches", "multiples of --small-batch"),
        (["--batches", "32,64"], "--batches", "at least 3"),
        (["--adascale-batches", "32"], "--adascale-batches", ">= 64"),
        (["--smith-factor", "1"], "--smith-factor", ">= 2"),
        (["--ramp-batch", "100"], "--ramp-batch", "multiples"),
        (["--ramp-epochs", "20"], "--ramp-epochs", "(0, --epochs 12)"),
        (["--noise-max-batch", "96"], "--noise-max-batch", "n·2^j"),
        (["--noise-decay", "1"], "--noise-decay", "[0, 1)"),
        (["--target-errors", "0"], "--target-errors", "(0, 100)"),
        (["--evals-per-epoch", "0"], "--evals-per-epoch", "at least 1"),
        (["--adascale-batches", "4096"], "--adascale-batches", "exceeds the 2048"),
        (["--samples", "2000"], "--batches", "128 does not divide the 1600"),
        (["--lr", "-1"], "--lr", ">= 0"),
        (["--batches", "32,x"], "--batches", "comma-separated integers"),
    ],
)
def test_bad_flags_are_one_line_errors_naming_the_flag(
    argv, flag, detail, flag_cache, tmp_path, capsys
):
    out = tmp_path / "out"
    base = ["--experiment", "adaptive-batch", "--samples", "2560", "--batches"]
    base += ["32,64,128", "--adascale-batches", "128", "--smith-max-batch", "256"]
    base += ["--ramp-batch", "256", "--noise-max-batch", "256"]
    base += ["--cache-dir", str(flag_cache), "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main([*base, *argv])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines)
    line = lines[-1]
    assert line.startswith(PROG_ERROR) and flag in line and detail in line, line
    assert not (out / "settings.json").exists()


def test_the_default_and_quick_commands_give_their_settings():
    _, args, experiment = parse(["--experiment", "adaptive-batch"])
    settings = experiment.settings(args)
    assert settings == ab.Settings()
    assert (args.samples, args.seeds) == (ab.DEFAULT_SAMPLES, 3)
    assert 0.8 * args.samples % max(settings.batches) == 0  # no example dropped
    _, args, experiment = parse(["--experiment", "adaptive-batch", "--quick"])
    quick = experiment.settings(args)
    kinds = {ab.kind_of(c) for c in quick.configs()}
    assert kinds == set(ab.KINDS)  # every kind of schedule, once at least
    assert args.seeds == 1 and quick.epochs == QUICK["epochs"]


def test_settings_round_trip_through_json():
    settings = ab.Settings()
    stored = json.loads(json.dumps(settings.__dict__))
    assert ab.EXPERIMENT.load_settings(stored) == settings


# --- end to end (slow) ------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adaptive-batch")
    out, cache = tmp / "out", tmp / "cache"
    done = subprocess.run(
        [sys.executable, "-m", "optax_warmup.demo", *_argv(out, cache)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out, cache, done.stdout


@pytest.mark.slow
def test_quick_run_writes_every_output_and_runs_every_schedule(quick_run):
    out, _, stdout = quick_run
    for name in ("results.json", "table.md", "settings.json", *FIGURES):
        assert (out / name).exists(), name
    for name in FIGURES:
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    report = json.loads((out / "results.json").read_text())
    settings = ab.EXPERIMENT.load_settings(report["experiment"])
    runs = {r["config"]: r for r in report["runs"]}
    assert set(runs) == set(settings.configs())
    assert len(list((out / "runs").glob("*.json"))) == len(runs)
    assert "| schedule |" in (out / "table.md").read_text() and "B_crit" in stdout
    n, n_train = settings.small_batch, report["dataset"]["train"]
    for config, run in runs.items():
        curve = run["curve"]
        assert len(run["test_error"]) == settings.epochs
        assert all(0 <= e <= 1 for e in curve["test_error"])
        assert np.all(np.diff(curve["examples"]) > 0)
        # A point at least every 1/8 epoch of examples.
        gaps = np.diff([0, *curve["examples"]])
        assert max(gaps) <= n_train / settings.evals_per_epoch + max(curve["batch"])
        assert not run["diverged"], config
    # The schedules did what they say.
    assert set(runs["fixed-64"]["curve"]["batch"]) == {64.0}
    ramp = runs["ramp"]["curve"]["batch"]
    assert ramp[0] < ramp[-1] == settings.ramp_batch
    noise = runs["noise"]["curve"]["batch"]
    assert min(noise) >= 2 * n and max(noise) <= settings.noise_max_batch
    smith = runs["smith"]["curve"]["batch"]
    assert smith[0] == n and smith[-1] == settings.smith_max_batch
    ada = runs[f"adascale-{settings.adascale_batches[0]}"]
    tau = ada["epoch_updates"]  # updates at each epoch of τ: fewer than the reference's
    assert tau[-1] < runs[settings.reference]["steps"]
    assert ada["examples"] > runs[settings.reference]["examples"]
    assert all(1 <= g <= settings.adascale_batches[0] / n for g in ada["curve"]["gain"])
    scale = settings.adascale_batches[0] / n  # τ stops within one gain of its end
    assert ada["curve"]["tau"][-1] <= settings.epochs * n_train / n + scale


@pytest.mark.slow
def test_a_killed_command_resumes_to_the_same_table(quick_run, tmp_path):
    """SIGKILL after the first finished run; the rerun trains only the others and
    writes the uninterrupted command's table."""
    reference_out, cache, _ = quick_run
    out = tmp_path / "out"
    command = [sys.executable, "-m", "optax_warmup.demo", *_argv(out, cache)]
    process = subprocess.Popen(
        command, env=_env(), stdout=subprocess.DEVNULL, start_new_session=True
    )
    total = len(json.loads((reference_out / "results.json").read_text())["runs"])
    try:
        deadline = time.monotonic() + 600
        while not any((out / "runs").glob("*.json")) and process.poll() is None:
            assert time.monotonic() < deadline, "no run finished"
            time.sleep(0.2)
        assert process.poll() is None, "the command ended before it was killed"
        os.killpg(process.pid, signal.SIGKILL)  # the command and its workers
        process.wait(30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)
    saved = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert 1 <= len(saved) < total, saved
    assert not (out / "results.json").exists()
    done = subprocess.run(
        command, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"skipping the {len(saved)} of {total} runs already finished" in done.stdout
    assert (out / "table.md").read_text() == (reference_out / "table.md").read_text()
    resumed = json.loads((out / "results.json").read_text())
    uninterrupted = json.loads((reference_out / "results.json").read_text())
    for a, b in zip(resumed["runs"], uninterrupted["runs"], strict=True):
        assert {**a, "seconds": 0} == {**b, "seconds": 0}


# --- the accumulated training loop --------------------------------------------------


class _Linear(nnx.Module):
    """A linear classifier of the flattened sequence: compiles in a blink."""

    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(40, 10, rngs=rngs)

    def __call__(self, x):
        return self.dense(x.reshape(x.shape[0], -1))


def _tiny_data(n_train: int = 256, n_test: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.normal(size=(n_train, 40, 1)).astype(np.float32),
        "y_train": rng.integers(0, 10, n_train).astype(np.int32),
        "x_test": rng.normal(size=(n_test, 40, 1)).astype(np.float32),
        "y_test": rng.integers(0, 10, n_test).astype(np.int32),
    }


def test_train_accumulated_evaluates_every_fraction_of_an_epoch_and_stops():
    data = _tiny_data()
    batch = ow.rampup_batch_size(32, 32, 256, 96)  # 32, 64, 96 over the 1st epoch
    tx = ow.accumulate(
        optax.chain(ow.track_noise_scale(decay=0.0), ow.sgd(0.1)),
        batch_size=batch,
        micro_batch_size=32,
    )
    seen = []
    out = training.train_accumulated(
        _Linear(nnx.Rngs(0)),
        tx,
        data,
        micro_batch_size=32,
        epochs=3,
        seed=0,
        evals_per_epoch=4,
        reads={"lr": ow.current_lr, "g2": lambda s: s.inner_state[0].g2},
        sums=("g2",),
        on_epoch=lambda epoch, error: seen.append(epoch),
    )
    curve = out["curve"]
    expected = _batches(batch, 256, 3)  # the batch of every update
    consumed = np.cumsum(expected)
    assert out["updates"] == len(expected) and out["examples"] == consumed[-1]
    # A point after the first update that completes each quarter epoch (64 samples).
    points = [
        int(np.argmax(consumed >= 64 * k))
        for k in range(1, 13)
        if consumed[-1] >= 64 * k
    ]
    points = sorted(set(points))
    assert curve["updates"] == [p + 1 for p in points]
    assert curve["examples"] == [int(consumed[p]) for p in points]
    assert curve["batch"] == [expected[p] for p in points]
    assert seen == [0, 1, 2] and len(out["test_error"]) == 3
    # An epoch ends at the first update that completes it (96 does not divide 256).
    ends = [int(consumed[np.argmax(consumed >= 256 * e)]) for e in (1, 2, 3)]
    assert out["epoch_examples"] == ends == [256, 544, 832]
    # The first update has one micro-batch: nothing measured; then |G|² estimates.
    assert curve["g2_sum"][0] == 0.0 and all(g != 0 for g in curve["g2_sum"][2:])
    assert all(0 <= e <= 1 for e in curve["test_error"]) and not out["diverged"]
