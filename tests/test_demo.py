"""Tests of the main job (`python -m optax_warmup.demo`), its data, the bench runner.

The end-to-end test runs ``--quick`` in a subprocess (as a user would) into a
temporary directory, with the dataset and compilation caches there too.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import optax_warmup as ow
from optax_warmup import _demo_report, _mnist1d, demo
from optax_warmup import _warmup_experiment as experiment

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH")) if p
    )
    env.update(extra)
    return env


# --- the quick run, end to end --------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    out, cache = tmp / "out", tmp / "cache"
    command = [sys.executable, "-m", "optax_warmup.demo", "--quick", "--no-progress"]
    command += ["--out", str(out), "--cache-dir", str(cache)]
    done = subprocess.run(
        command, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out, cache, done.stdout


def test_quick_run_writes_every_output(quick_run):
    out, _, stdout = quick_run
    for name in ("training_error.png", "lr_schedules.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
    table = (out / "table.md").read_text()
    assert table in stdout  # the table is printed too
    assert len(table.strip().splitlines()) == 2 + len(experiment.CONFIGS)


def test_quick_run_results_are_complete_and_finite(quick_run):
    out, _, _ = quick_run
    report = json.loads((out / "results.json").read_text())
    exp = report["experiment"]
    assert report["seeds"] == [0]
    assert set(report["summary"]) == set(experiment.CONFIGS)
    assert len(report["runs"]) == len(experiment.CONFIGS)
    for run in report["runs"]:
        assert not run["diverged"]
        for key in ("train_loss", "train_error", "test_error", "lr"):
            values = run[key]
            assert len(values) == exp["epochs"], key
            assert all(math.isfinite(v) for v in values), (run["config"], key)
        assert all(0 <= e <= 1 for e in run["train_error"] + run["test_error"])
        assert run["final_test_error"] == np.median(run["test_error"][-5:])
    for s in report["summary"].values():
        assert math.isfinite(s["test_error_mean"]) and s["test_error_std"] == 0.0
    # Even four epochs beat chance (90% error) by far.
    assert report["summary"]["reference"]["test_error_mean"] < 0.7
    assert report["anchors"]["mnist1d_paper_cnn_test_accuracy_percent"] == 94


def test_quick_run_used_the_schedules_it_plots(quick_run):
    """The rate after each epoch's last step is the Goyal schedule's at that step."""
    out, _, _ = quick_run
    report = json.loads((out / "results.json").read_text())
    e = report["experiment"]
    for run in report["runs"]:
        warmup = experiment.CONFIGS[run["config"]][1]
        schedule = ow.goyal_schedule(
            run["batch_size"],
            run["steps_per_epoch"],
            base_lr=e["lr"],
            base_batch_size=e["small_batch"],
            warmup_epochs=e["warmup_epochs"],
            milestones=e["milestones"],
            warmup=warmup,
        )
        last_steps = np.arange(1, e["epochs"] + 1) * run["steps_per_epoch"] - 1
        expected = [float(schedule(t)) for t in last_steps]
        np.testing.assert_allclose(run["lr"], expected, rtol=1e-6)
        # Linear scaling: the large batch peaks at kη.
        k = run["batch_size"] / e["small_batch"]
        assert max(run["lr"]) == pytest.approx(k * e["lr"], rel=1e-6)


def test_replot_redraws_table_and_figures_from_the_json(quick_run, tmp_path):
    out, _, _ = quick_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for name in ("table.md", "training_error.png", "lr_schedules.png"):
        (copy / name).unlink()
    demo.main(["--replot", str(copy)])
    assert (copy / "table.md").read_text() == (out / "table.md").read_text()
    for name in ("training_error.png", "lr_schedules.png"):
        assert (copy / name).read_bytes().startswith(PNG_MAGIC)


def test_quick_run_cached_the_dataset(quick_run):
    _, cache, stdout = quick_run
    assert "(generated)" in stdout
    assert _mnist1d.cache_path(demo.QUICK["samples"], 42, cache).exists()


# --- the dataset cache ------------------------------------------------------------


def test_dataset_is_generated_once_then_reused(tmp_path, monkeypatch):
    import mnist1d.data
    import requests

    def no_network(*args, **kwargs):
        raise AssertionError("the demo must never download MNIST-1D")

    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(mnist1d.data, "get_dataset", no_network)

    first, generated = _mnist1d.load(200, cache_dir=tmp_path)
    assert generated
    assert list(tmp_path.iterdir()) == [_mnist1d.cache_path(200, 42, tmp_path)]

    def must_not_generate(*args, **kwargs):
        raise AssertionError("the cached dataset was generated again")

    monkeypatch.setattr(_mnist1d, "generate", must_not_generate)
    second, generated = _mnist1d.load(200, cache_dir=tmp_path)
    assert not generated
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
        assert first[key].dtype == second[key].dtype


def test_standard_split_is_4000_and_1000(tmp_path):
    data, _ = _mnist1d.load(_mnist1d.STANDARD_SAMPLES, cache_dir=tmp_path)
    assert data["x_train"].shape == (4000, 40, 1)
    assert data["x_test"].shape == (1000, 40, 1)
    assert data["x_train"].dtype == np.float32
    assert data["y_train"].dtype == np.int32
    labels = np.concatenate([data["y_train"], data["y_test"]])
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 500))
    # The package standardizes the whole set.
    x = np.concatenate([data["x_train"], data["x_test"]])
    assert abs(x.mean()) < 1e-3 and abs(x.std() - 1) < 1e-3


def test_generation_leaves_numpy_global_state_alone():
    np.random.seed(123)  # noqa: NPY002 (the state that mnist1d reseeds)
    expected = np.random.random()  # noqa: NPY002
    np.random.seed(123)  # noqa: NPY002
    _mnist1d.generate(20, seed=7)
    assert np.random.random() == expected  # noqa: NPY002


def test_different_seeds_give_different_data():
    a = _mnist1d.generate(20, seed=1)
    b = _mnist1d.generate(20, seed=2)
    assert not np.array_equal(a["x_train"], b["x_train"])


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("OPTAX_WARMUP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _mnist1d.default_cache_dir() == tmp_path / "xdg" / "optax_warmup"
    monkeypatch.setenv("OPTAX_WARMUP_CACHE", str(tmp_path / "mine"))
    assert _mnist1d.default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("OPTAX_WARMUP_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert _mnist1d.default_cache_dir() == Path.home() / ".cache" / "optax_warmup"


@pytest.mark.parametrize("bad", [0, 15, 10, -20, 100.0, True, "200"])
def test_bad_num_samples_raise(bad, tmp_path):
    with pytest.raises(ValueError, match="num_samples"):
        _mnist1d.load(bad, cache_dir=tmp_path)


# --- pure helpers -----------------------------------------------------------------


def test_default_milestones_scale_goyals():
    assert experiment.default_milestones(90) == (30.0, 60.0, 80.0)
    assert experiment.default_milestones(30) == (10.0, 20.0, 27.0)
    assert experiment.default_milestones(45) == (15.0, 30.0, 40.0)


def test_final_error_is_the_median_of_the_last_five_epochs():
    assert experiment.final_error([0.9, 0.1, 0.5, 0.4, 0.3, 0.2, 0.6]) == 0.4
    assert experiment.final_error([0.3, 0.1]) == pytest.approx(0.2)


def _fake_runs(errors: dict[str, list[float]]) -> list[dict]:
    return [
        {
            "config": config,
            "final_test_error": e,
            "final_train_error": e / 2,
            "diverged": e > 0.5,
        }
        for config, values in errors.items()
        for e in values
    ]


def test_summary_and_table():
    exp = experiment.Experiment(small_batch=32, large_batch=512, lr=0.05)
    runs = _fake_runs(
        {
            "reference": [0.10, 0.12, 0.14],
            "no_warmup": [0.20, 0.22, 0.90],
            "constant_warmup": [0.15, 0.15, 0.15],
            "gradual_warmup": [0.11, 0.12, 0.13],
        }
    )
    summary = _demo_report.summarize(runs, exp)
    ref, gradual = summary["reference"], summary["gradual_warmup"]
    assert ref["test_error_mean"] == pytest.approx(0.12)
    assert ref["test_error_std"] == pytest.approx(0.02)  # ddof=1
    assert ref["peak_lr"] == 0.05 and gradual["peak_lr"] == pytest.approx(0.8)
    assert gradual["gap_vs_reference"] == pytest.approx(0.0)
    assert summary["constant_warmup"]["gap_vs_reference"] == pytest.approx(0.03)
    expected_se = math.sqrt(0.0 / 3 + 0.02**2 / 3)
    assert summary["constant_warmup"]["gap_standard_error"] == pytest.approx(
        expected_se
    )
    assert summary["no_warmup"]["diverged_runs"] == 1

    table = _demo_report.markdown_table(summary).splitlines()
    assert len(table) == 2 + 4
    assert "| 12.00 ± 2.00 |" in table[2]
    assert "(1 diverged)" in table[3]
    assert "+3.00 ± 1.15" in table[4]


# --- the command line -------------------------------------------------------------


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--small-batch",
        "--large-batch",
        "--lr",
        "--epochs",
        "--seeds",
        "--warmup-epochs",
        "--milestones",
        "--samples",
        "--out",
        "--quick",
        "--workers",
    ):
        assert flag in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--large-batch", "100"], "not a multiple"),
        (["--epochs", "0"], "at least 1"),
        (["--samples", "200", "--large-batch", "1024"], "exceeds"),
        (["--samples", "2000", "--milestones", "3,2"], "milestones"),
        (["--samples", "2000", "--warmup-epochs", "12"], "milestones"),
        (["--samples", "2000", "--lr", "nan"], "base_lr"),
    ],
)
def test_bad_flags_fail_before_training(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main([*argv, "--cache-dir", str(tmp_path), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


# --- several devices: the batch is sharded, the result is the same -----------------

_SHARDED = """
import json, sys
import jax
from optax_warmup import _mnist1d, _warmup_experiment as W
assert jax.device_count() == 2, jax.devices()
data, _ = _mnist1d.load(400, cache_dir=sys.argv[1])
exp = W.Experiment(small_batch=16, large_batch=64, epochs=2, warmup_epochs=1.0,
                   milestones=(1.5,), widths=(4, 8, 8))
one = W.train_run(exp, "gradual_warmup", 0, data, devices=jax.devices()[:1])
two = W.train_run(exp, "gradual_warmup", 0, data)
print(json.dumps({"one": one["train_loss"], "two": two["train_loss"],
                  "err1": one["test_error"], "err2": two["test_error"]}))
"""


def test_train_step_shards_the_batch_over_devices(tmp_path):
    flags = "--xla_force_host_platform_device_count=2"
    done = subprocess.run(
        [sys.executable, "-c", _SHARDED, str(tmp_path)],
        env=_env(XLA_FLAGS=flags, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(out["one"], out["two"], rtol=1e-4)
    np.testing.assert_allclose(out["err1"], out["err2"], atol=0.02)


# --- benchmarks/run_all.py --------------------------------------------------------


def _load_run_all():
    spec = importlib.util.spec_from_file_location(
        "run_all", ROOT / "benchmarks" / "run_all.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_all_runs_every_script_and_records_failures(tmp_path, monkeypatch):
    run_all = _load_run_all()
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "_common.py").write_text("raise AssertionError('not a benchmark')\n")
    (scripts / "fast_thing.py").write_text(
        textwrap.dedent(
            '''
            """Fast thing against slow thing."""
            def main(quick=False):
                print("| a | b |")
                print("|---|---|")
                print(f"| 1 | {quick} |")
                return {"ratio": 0.5, "quick": quick}
            '''
        )
    )
    (scripts / "broken.py").write_text(
        '"""Broken."""\ndef main(quick=False):\n    raise RuntimeError("boom")\n'
    )
    results = tmp_path / "results"
    monkeypatch.chdir(ROOT)
    status = run_all.main(
        ["--quick", "--dir", str(scripts), "--results-dir", str(results)]
    )
    assert status == 1  # one script failed
    (json_path,) = results.glob("*-quick.json")
    report = json.loads(json_path.read_text())
    assert set(report["benchmarks"]) == {"broken", "fast_thing"}
    fast = report["benchmarks"]["fast_thing"]
    assert fast["ok"] and fast["result"] == {"ratio": 0.5, "quick": True}
    assert fast["what"] == "Fast thing against slow thing."
    broken = report["benchmarks"]["broken"]
    assert not broken["ok"] and "boom" in broken["error"]
    md = json_path.with_suffix(".md").read_text()
    assert "| fast_thing | Fast thing against slow thing. | ok |" in md
    assert "| 1 | True |" in md
    assert report["environment"]["backend"] == "cpu"


def test_run_all_finds_the_repository_benchmarks():
    run_all = _load_run_all()
    names = [p.name for p in run_all.discover()]
    assert "run_all.py" not in names and "_common.py" not in names
    assert names == sorted(names)
