"""Tests of the batch-size experiment (``python -m optax_warmup.demo --experiment
batch-size``): its runs, its analysis (breakdown, noise scale, steps to target),
its report and its command line. The end-to-end test runs ``--quick`` in a
subprocess, as a user would, and carries the ``slow`` marker."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import optax_warmup as ow
from optax_warmup.demo import batch_size, training
from optax_warmup.demo import data as demo_data
from optax_warmup.demo.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROG_ERROR = "python -m optax_warmup.demo: error: "
FIGURES = ("error_vs_batch.png", "noise_scale.png", "steps_to_target.png")
QUICK = batch_size.EXPERIMENT.quick


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH")) if p
    )
    return env


def _argv(out: Path, cache: Path) -> list[str]:
    return [
        "--experiment",
        "batch-size",
        "--quick",
        "--no-progress",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
    ]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batch-size")
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


def _quick_settings() -> batch_size.Settings:
    return batch_size.Settings(
        batches=(32, 256),
        lars_batches=(256,),
        epochs=3,
        warmup_epochs=1.0,
        milestones=(2.0,),
        target_error=0.5,
    )


@pytest.mark.slow
def test_quick_run_writes_the_table_figures_and_every_run(quick_run):
    out, _, stdout = quick_run
    for name in FIGURES:
        png = (out / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 10_000, name
    table = (out / "table.md").read_text()
    assert table in stdout
    lines = table.strip().splitlines()
    assert lines[0].split(" | ")[1:4] == ["optimizer", "peak rate", "test error (%)"]
    assert [line.split(" | ")[:2] for line in lines[2:]] == [
        ["| 32", "SGD"],
        ["| 256", "SGD"],
        ["| 256", "LARS"],
    ]
    assert "breaks down at" in stdout or "no breakdown" in stdout
    assert "B_simple over training ≈" in stdout
    assert "McCandlish et al.'s critical batch" in stdout
    names = sorted(p.name for p in (out / "runs").iterdir())
    configs = ("sgd-32", "sgd-256", "lars-256")
    assert names == sorted(f"{c}-seed0.json" for c in configs)
    # One seed: Welch's p is undefined, shown as – and said under the table.
    assert [line.split(" | ")[5] for line in lines[2:]] == ["–"] * 3
    assert "fewer than 2 seeds (undefined)" in stdout


@pytest.mark.slow
def test_quick_run_measured_the_noise_scale_and_used_its_schedules(quick_run):
    out, _, _ = quick_run
    report = json.loads((out / "results.json").read_text())
    assert report["experiment_name"] == "batch-size"
    settings = batch_size.EXPERIMENT.load_settings(report["experiment"])
    assert settings == _quick_settings()
    for run in report["runs"]:
        assert len(run["test_error"]) == settings.epochs
        steps = run["steps_per_epoch"]
        schedule = settings.schedule(run["config"], steps)
        last = np.arange(1, settings.epochs + 1) * steps - 1
        np.testing.assert_allclose(
            run["lr"], [float(schedule(t)) for t in last], rtol=1e-6
        )
        if run["batch_size"] == settings.small_batch:
            assert "noise_scale" not in run  # one group: nothing to measure
            continue
        # The per-epoch B_simple is the ratio of the tracker's two averages.
        for b, g2, trace in zip(
            run["noise_scale"], run["g2"], run["trace_sigma"], strict=True
        ):
            assert math.isfinite(b) and b == pytest.approx(trace / g2, rel=1e-5)
        assert all(t > 0 for t in run["trace_sigma"])
    rows = report["summary"]["rows"]
    assert rows["sgd-256"]["peak_lr"] == pytest.approx(0.8)  # kη, k = 8
    assert rows["lars-256"]["peak_lr"] == settings.lars_lr
    for name, row in rows.items():
        assert row["p_value"] is None and row["gap_standard_error"] == 0
        if name != "sgd-32":
            assert row["noise_scale"] > 0
    analysis = report["summary"]["analysis"]
    assert analysis["predicted_from_batch"] == 256
    assert analysis["predicted_critical_batch"] == rows["sgd-256"]["noise_scale"]
    assert set(report["anchors"]) == set(batch_size.ANCHORS)


@pytest.mark.slow
def test_rerun_resumes_everything_and_other_settings_are_refused(
    quick_run, tmp_path, capsys
):
    out, cache, _ = quick_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "table.md").unlink()
    result = main(_argv(copy, cache))
    assert "skipping the 3 of 3 runs already finished" in capsys.readouterr().out
    assert (copy / "table.md").read_text() == (out / "table.md").read_text()
    assert result["resumed_runs"] == 3
    with pytest.raises(SystemExit):
        main([*_argv(copy, cache), "--lars-lr", "0.5"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    lars_lr = batch_size.Settings().lars_lr
    assert f"--lars-lr 0.5 (the runs there have {lars_lr:g})" in err
    assert "--fresh" in err


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
    assert 1 <= len(saved) < 3, saved
    assert not (out / "results.json").exists()
    done = subprocess.run(
        command, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"skipping the {len(saved)} of 3 runs already finished" in done.stdout
    assert (out / "table.md").read_text() == (reference_out / "table.md").read_text()
    resumed = json.loads((out / "results.json").read_text())
    uninterrupted = json.loads((reference_out / "results.json").read_text())
    for a, b in zip(resumed["runs"], uninterrupted["runs"], strict=True):
        assert {**a, "seconds": 0} == {**b, "seconds": 0}


# --- the tracked train step ---------------------------------------------------------


@pytest.mark.slow
def test_tracked_train_step_trains_as_the_plain_one():
    """Gradients per ghost BatchNorm group, averaged, give the plain step's curves."""
    rng = np.random.default_rng(0)
    data = {
        "x_train": rng.normal(size=(256, 40, 1)).astype(np.float32),
        "y_train": rng.integers(0, 10, 256).astype(np.int32),
        "x_test": rng.normal(size=(64, 40, 1)).astype(np.float32),
        "y_test": rng.integers(0, 10, 64).astype(np.int32),
    }
    settings = batch_size.Settings(
        batches=(16, 64), lars_batches=(), widths=(4, 8, 8), small_batch=16
    )
    steps = training.steps_per_epoch(256, 64)

    def train(tracked: bool) -> dict:
        make = settings.optimizer if tracked else settings.recipe
        tx = make("sgd-64", steps)
        return training.train_classifier(
            settings.model(0),
            tx,
            data,
            batch_size=64,
            epochs=2,
            seed=0,
            label_smoothing=0.1,
            readouts=(
                batch_size.READOUTS_WITH_NOISE_SCALE
                if tracked
                else {"lr": ow.current_lr}
            ),
            noise_scale_group=16 if tracked else None,
        )

    plain, tracked = train(False), train(True)
    np.testing.assert_allclose(tracked["train_loss"], plain["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(tracked["test_error"], plain["test_error"], atol=0.02)
    assert tracked["lr"] == plain["lr"]
    assert all(math.isfinite(b) for b in tracked["noise_scale"])


# --- the analysis --------------------------------------------------------------------


def _run(config, seed, final, curve=None, g2=None, trace=None, steps=10):
    optimizer, batch = batch_size.parse_config(config)
    run = {
        "config": config,
        "optimizer": optimizer,
        "seed": seed,
        "batch_size": batch,
        "steps_per_epoch": steps,
        "final_test_error": final,
        "test_error": curve or [0.5, 0.2, final],
        "diverged": False,
    }
    if g2 is not None:
        run.update(g2=g2, trace_sigma=trace)
    return run


SETTINGS = batch_size.Settings(
    batches=(32, 64, 128, 256),
    lars_batches=(128, 256),
    epochs=3,
    warmup_epochs=1.0,
    milestones=(2.0,),
    target_error=0.1,
)


def _fake_results():
    errors = {
        "sgd-32": [0.050, 0.052, 0.054],
        "sgd-64": [0.051, 0.053, 0.055],  # within the noise
        "sgd-128": [0.056, 0.057, 0.058],  # Δ = +0.5pp, SE ≈ 0.13pp: broken
        "sgd-256": [0.20, 0.25, 0.30],
        "lars-128": [0.052, 0.053, 0.054],
        "lars-256": [0.09, 0.10, 0.11],
    }
    runs = []
    for config, values in errors.items():
        for seed, e in enumerate(values):
            tracked = config != "sgd-32"
            runs.append(
                _run(
                    config,
                    seed,
                    e,
                    curve=[0.5, 0.09, e] if e < 0.1 else [0.5, 0.4, e],
                    g2=[2.0, 1.0, 1.0] if tracked else None,
                    trace=[100.0, 100.0, 200.0 + 40 * seed] if tracked else None,
                )
            )
    return runs


def test_breakdown_is_the_first_batch_beyond_two_standard_errors():
    summary = batch_size.summarize(_fake_results(), SETTINGS)
    rows, a = summary["rows"], summary["analysis"]
    assert list(rows) == SETTINGS.configs()
    gap = rows["sgd-128"]["gap_vs_reference"]
    se = math.sqrt(0.001**2 / 3 + 0.002**2 / 3)
    assert gap == pytest.approx(0.005) and rows["sgd-128"][
        "gap_standard_error"
    ] == pytest.approx(se)
    assert rows["sgd-64"]["gap_vs_reference"] < 2 * rows["sgd-64"]["gap_standard_error"]
    assert a["breakdown"] == {"sgd": 128, "lars": 256}
    assert a["flat_up_to"] == {"sgd": 64, "lars": 128}
    # B_simple of a run: Σ tr Σ / Σ |G|² over epochs = (400 + 40 s) / 4.
    assert rows["sgd-64"]["noise_scales"] == pytest.approx([100.0, 110.0, 120.0])
    assert a["predicted_critical_batch"] == pytest.approx(110.0)
    assert a["predicted_from_batch"] == 64
    assert rows["sgd-32"]["noise_scale"] is None and rows["sgd-32"]["p_value"] is None
    # Steps to 10%: between epochs 1 and 2 of 10 steps each (0.5 → 0.09, linear);
    # never for the broken sgd-256.
    assert rows["sgd-64"]["steps_to_target"] == pytest.approx(10 + 10 * 0.4 / 0.41)
    assert rows["sgd-256"]["steps_to_target"] is None


def test_no_breakdown_leaves_the_prediction_unscored():
    runs = [r for r in _fake_results() if r["config"] in ("sgd-32", "sgd-64")]
    settings = dataclasses.replace(SETTINGS, batches=(32, 64), optimizers=("sgd",))
    a = batch_size.summarize(runs, settings)["analysis"]
    assert a["breakdown"] == {"sgd": None} and a["flat_up_to"] == {"sgd": 64}
    assert "no breakdown up to the largest batch" in "\n".join(
        batch_size.notes({"rows": {}, "analysis": a})
    )
    a["breakdown"], a["flat_up_to"] = {"lars": 1024}, {"lars": None}
    assert "LARS: worse than the reference from its smallest batch, kn=1024" in (
        "\n".join(batch_size.notes({"rows": {}, "analysis": a}))
    )


def test_steps_to_target_and_training_noise_scale_edges():
    run = _run("sgd-64", 0, 0.3, curve=[0.5, 0.4, 0.3], steps=7)
    assert batch_size.steps_to_target(run, 0.4) == 14
    assert batch_size.steps_to_target(run, 0.29) is None
    assert batch_size.training_noise_scale(run) is None
    run.update(g2=[-1.0, 0.5], trace_sigma=[1.0, 2.0])
    assert batch_size.training_noise_scale(run) is None  # Σ|G|² <= 0
    run.update(g2=[float("nan"), 1.0])
    assert batch_size.training_noise_scale(run) is None


def test_table_rows_and_notes():
    summary = batch_size.summarize(_fake_results(), SETTINGS)
    table = batch_size.markdown_table(summary).strip().splitlines()
    assert len(table) == 2 + len(SETTINGS.configs())
    assert table[0] == (
        "| batch kn | optimizer | peak rate | test error (%) | Δ vs reference (pp) "
        "| p vs reference | B_simple | steps to target |"
    )
    assert table[2] == "| 32 | SGD | 0.1 | 5.20 ± 0.20 | – | – | – | 20 |"
    assert table[4].startswith("| 128 | SGD | 0.4 | 5.70 ± 0.10 | +0.50 ± 0.13 |")
    assert table[5].endswith("| not reached |")
    assert f"| LARS | {SETTINGS.lars_lr:g} |" in table[6]
    notes = "\n".join(batch_size.notes(summary))
    assert "SGD: breaks down at kn=128; flat up to kn=64" in notes
    assert "LARS: breaks down at kn=256; flat up to kn=128" in notes
    assert "B_simple over training ≈ 110 (SGD runs at kn=64)" in notes
    assert "McCandlish et al.'s critical batch at 10%: B_crit = E_min/S_min" in notes
    assert "B_simple over the same stretch" in notes


def test_figures_are_drawn_from_fake_runs(tmp_path):
    paths = batch_size.plot(_fake_results(), SETTINGS, tmp_path)
    assert [p.name for p in paths] == list(FIGURES)
    for path in paths:
        assert path.read_bytes().startswith(PNG_MAGIC)


def test_settings_round_trip_through_json_and_rates():
    stored = json.loads(json.dumps(dataclasses.asdict(SETTINGS)))
    assert batch_size.EXPERIMENT.load_settings(stored) == SETTINGS
    assert SETTINGS.peak_lr("sgd-256") == pytest.approx(0.8)
    assert SETTINGS.peak_lr("lars-256") == SETTINGS.lars_lr
    schedule = SETTINGS.schedule("lars-256", 10)
    assert float(schedule(0)) == pytest.approx(SETTINGS.lars_lr / 8)  # peak / k
    assert float(schedule(10)) == pytest.approx(SETTINGS.lars_lr)
    runs = batch_size.EXPERIMENT.runs(SETTINGS, (0, 1))
    assert len(runs) == 12 and runs[0].key == "sgd-32-seed0"


# --- the command line -------------------------------------------------------------


@pytest.fixture(scope="module")
def flag_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("flag-cache")
    demo_data.load(2000, cache_dir=cache)
    return cache


@pytest.mark.parametrize(
    "argv, flag, detail",
    [
        (["--batches", "32,48"], "--batches", "48: not a multiple of --small-batch"),
        (["--batches", "64,128"], "--batches", "must include the reference batch"),
        (["--batches", "32,128,64"], "--batches", "strictly increasing"),
        (["--batches", "32,x"], "--batches", "comma-separated integers"),
        (["--lars-batches", "100"], "--lars-batches", "not a multiple"),
        (["--optimizers", "lars"], "--optimizers", "must include sgd"),
        (["--optimizers", "adam"], "--optimizers", "subset of sgd,lars"),
        (["--target-error", "0"], "--target-error", "(0, 100)"),
        (["--batches", "32,2048"], "--batches", "exceeds the 1600 training"),
        (["--lars-lr", "-1"], "--lars-lr", ">= 0"),
        (["--lr", "nan"], "--lr", "finite"),
        (["--trust-coefficient", "0"], "--trust-coefficient", "trust_coefficient"),
        (["--milestones", "40", "--epochs", "4"], "--milestones", "end of training"),
        (["--widths", "8,x"], "--widths", "comma-separated integers"),
        (["--out", "/proc/x"], "--out", "cannot write to /proc/x"),
    ],
)
def test_bad_flags_are_one_line_errors_naming_the_flag(
    argv, flag, detail, flag_cache, tmp_path, capsys
):
    out = tmp_path / "out"
    base = ["--experiment", "batch-size", "--samples", "2000", "--batches", "32,64"]
    base += ["--lars-batches", "64", "--cache-dir", str(flag_cache), "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main([*base, *argv])
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(PROG_ERROR) and flag in line and detail in line, line
    assert not (out / "settings.json").exists()


def test_help_of_the_experiment_lists_its_flags_and_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--experiment", "batch-size", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--batches",
        "--optimizers",
        "--lars-batches",
        "--lars-lr",
        "--target-error",
        "--trust-coefficient",
    ):
        assert flag in text
    assert "(default: 30720)" in text  # its own --samples default


def test_the_default_command_gives_the_default_settings():
    from optax_warmup.demo.__main__ import parse
    from optax_warmup.demo.flags import default_milestones

    _, args, experiment = parse(["--experiment", "batch-size"])
    settings = experiment.settings(args)
    assert settings == batch_size.Settings()
    assert settings.milestones == default_milestones(settings.epochs)
    assert (args.samples, args.seeds) == (30720, 3)
    assert 0.8 * args.samples % max(settings.batches) == 0  # no example dropped
    _, args, _ = parse(["--experiment", "batch-size", "--quick"])
    assert args.seeds == QUICK["seeds"] and args.batches == (32, 256)
