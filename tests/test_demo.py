"""Tests of the main job (`python -m optax_warmup.demo`): its data, runs and report.

The end-to-end tests run ``--quick`` in a subprocess (as a user would) into a
temporary directory, with the dataset and compilation caches there too; they and
the other tests that start processes carry the ``slow`` marker.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest

import optax_warmup as ow
from optax_warmup.demo import data as demo_data
from optax_warmup.demo import flags, report, runner, store
from optax_warmup.demo import stats as demo_stats
from optax_warmup.demo import warmup as experiment
from optax_warmup.demo.__main__ import main
from optax_warmup.demo.__main__ import parse as main_parse
from optax_warmup.demo.experiment import Run

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK = experiment.EXPERIMENT.quick
PROG = (sys.executable, "-m", "optax_warmup.demo")
PROG_ERROR = "python -m optax_warmup.demo: error: "


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH")) if p
    )
    env.update(extra)
    return env


def _quick_command(out: Path, cache: Path) -> list[str]:
    return [
        *PROG,
        "--quick",
        "--no-progress",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
    ]


# --- the quick run, end to end --------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    out, cache = tmp / "out", tmp / "cache"
    done = subprocess.run(
        _quick_command(out, cache),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out, cache, done.stdout


@pytest.mark.slow
def test_quick_run_writes_every_output(quick_run):
    out, _, stdout = quick_run
    for name in ("training_error.png", "lr_schedules.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
    table = (out / "table.md").read_text()
    assert table in stdout  # the table is printed too
    assert len(table.strip().splitlines()) == 2 + len(experiment.CONFIGS)
    # One seed a side: no 90% interval, shown as – and said under the table, and
    # no finding shown.
    for row in table.strip().splitlines()[3:]:
        assert row.split(" | ")[4].endswith(" [–, –]"), row
    assert "too few for one" in stdout
    assert stdout.count("not shown ") == 4
    # Every run is on disk on its own, besides the report.
    names = sorted(p.name for p in (out / "runs").iterdir())
    assert names == sorted(f"{c}-seed0.json" for c in experiment.CONFIGS)


@pytest.mark.slow
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
        on_disk = json.loads((out / "runs" / f"{run['config']}-seed0.json").read_text())
        assert on_disk == run
    for s in report["summary"].values():
        assert math.isfinite(s["test_error_mean"]) and s["test_error_std"] == 0.0
        assert s["p_value"] is None
    # Even four epochs beat chance (90% error) by far.
    assert report["summary"]["reference"]["test_error_mean"] < 0.7
    assert report["anchors"]["mnist1d_paper_cnn_test_accuracy_percent"] == 94
    assert report["experiment_name"] == "warmup" and report["resumed_runs"] == 0


@pytest.mark.slow
def test_quick_run_used_the_schedules_it_plots(quick_run):
    """The rate after each epoch's last step is the Goyal schedule's at that step."""
    out, _, _ = quick_run
    report = json.loads((out / "results.json").read_text())
    e = report["experiment"]
    for run in report["runs"]:
        warmup = experiment.CONFIGS[run["config"]].warmup
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


@pytest.mark.slow
def test_replot_redraws_table_and_figures_from_the_json(quick_run, tmp_path):
    out, _, _ = quick_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for name in ("table.md", "training_error.png", "lr_schedules.png"):
        (copy / name).unlink()
    main(["--replot", str(copy)])
    assert (copy / "table.md").read_text() == (out / "table.md").read_text()
    for name in ("training_error.png", "lr_schedules.png"):
        assert (copy / name).read_bytes().startswith(PNG_MAGIC)


@pytest.mark.slow
def test_quick_run_cached_the_dataset(quick_run):
    _, cache, stdout = quick_run
    assert "(generated)" in stdout
    assert demo_data.cache_path(QUICK["samples"], 42, cache).exists()


# --- nothing lost when a command stops ----------------------------------------------


def _processes_with(marker: str, command: str = "") -> list[int]:
    """The live processes whose environment holds ``marker`` (Linux /proc), and
    whose command line holds ``command``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in environ and command.encode() in cmdline:
            if state != "Z":
                found.append(int(entry.name))
    return found


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_a_killed_command_resumes_to_the_same_table(quick_run, tmp_path):
    """SIGKILL after the first finished run; the rerun trains only the others."""
    reference_out, cache, _ = quick_run
    out = tmp_path / "out"
    marker = f"OPTAX_WARMUP_TEST={uuid.uuid4().hex}"
    name, value = marker.split("=")
    command = _quick_command(out, cache)
    process = subprocess.Popen(
        command, env=_env(**{name: value}), stdout=subprocess.PIPE, text=True
    )
    try:
        _wait_for(
            lambda: any((out / "runs").glob("*.json")) or process.poll() is not None,
            300,
            "the first finished run",
        )
        assert process.poll() is None, "the command ended before it was killed"
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        process.kill()
        process.communicate()
    saved = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert 1 <= len(saved) < len(experiment.CONFIGS), saved
    assert not (out / "results.json").exists()
    # The orphaned workers notice that their parent is gone and exit.
    _wait_for(lambda: not _processes_with(marker), 15, "the workers to exit")

    done = subprocess.run(
        command, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"skipping the {len(saved)} of 4 runs already finished" in done.stdout
    assert (out / "table.md").read_text() == (reference_out / "table.md").read_text()
    resumed = json.loads((out / "results.json").read_text())
    uninterrupted = json.loads((reference_out / "results.json").read_text())
    assert resumed["resumed_runs"] == len(saved)
    for a, b in zip(resumed["runs"], uninterrupted["runs"], strict=True):
        assert {**a, "seconds": 0} == {**b, "seconds": 0}


@pytest.mark.slow
def test_sigterm_ends_the_workers_and_says_how_to_resume(tmp_path, quick_run):
    _, cache, _ = quick_run
    out = tmp_path / "out"
    marker = f"OPTAX_WARMUP_TEST={uuid.uuid4().hex}"
    name, value = marker.split("=")
    process = subprocess.Popen(
        _quick_command(out, cache),
        env=_env(**{name: value}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def workers() -> list[int]:
        return _processes_with(marker, "--multiprocessing-fork")

    try:
        # settings.json is written just before the workers start.
        _wait_for(lambda: (out / "settings.json").exists(), 120, "the first run")
        _wait_for(lambda: len(workers()) == 2, 60, "both workers")
        time.sleep(1.0)  # past their start-up
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in stderr
    assert "runs are saved in" in stderr and "the same command resumes" in stderr
    assert workers() == []  # ended (and waited for) before the command exited
    _wait_for(lambda: not _processes_with(marker), 15, "the resource tracker")


@pytest.mark.slow
def test_rerunning_a_finished_command_trains_nothing(quick_run, tmp_path, capsys):
    out, cache, _ = quick_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    stamps = {p.name: p.stat().st_mtime_ns for p in (copy / "runs").iterdir()}
    (copy / "table.md").unlink()
    result = main(
        ["--quick", "--no-progress", "--out", str(copy), "--cache-dir", str(cache)]
    )
    stdout = capsys.readouterr().out
    assert "skipping the 4 of 4 runs already finished" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in (copy / "runs").iterdir()} == stamps
    assert (copy / "table.md").read_text() == (out / "table.md").read_text()
    assert result["resumed_runs"] == 4


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, named",
    [
        (["--epochs", "5"], "--epochs 5 (the runs there have 4)"),
        (["--seeds", "2"], "--seeds 2 (the runs there have 1)"),
        (["--lr", "0.2", "--widths", "8,8,8"], "--lr 0.2 (the runs there have 0.1)"),
    ],
)
def test_other_settings_in_the_same_out_are_refused(
    quick_run, tmp_path, capsys, flags, named
):
    out, cache, _ = quick_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = {p.name: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    argv = ["--quick", "--out", str(copy), "--cache-dir", str(cache), *flags]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(PROG_ERROR + "argument --out: ")
    assert named in err and "--fresh" in err
    if "--widths" in flags:
        assert "--widths 8,8,8 (the runs there have 8,16,32)" in err
    after = {p.name: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert after == before


def test_store_keeps_finished_runs_and_starts_over_when_fresh(tmp_path):
    settings = {"experiment": "warmup", "epochs": 4, "milestones": (2.0, 3.0)}
    first = store.RunStore(tmp_path, settings)
    assert first.finished() == {}
    assert not (tmp_path / "settings.json").exists()  # nothing written before start
    first.start()
    first.save("a-seed0", {"config": "a", "seed": 0, "curve": (0.5, 0.25)})

    again = store.RunStore(tmp_path, settings)
    again.check()
    assert again.finished() == {
        "a-seed0": {"config": "a", "seed": 0, "curve": [0.5, 0.25]}
    }

    other = store.RunStore(tmp_path, {**settings, "epochs": 5, "seeds": 2})
    with pytest.raises(store.SettingsMismatch) as info:
        other.check()
    assert info.value.differences == (("epochs", 4, 5), ("seeds", None, 2))

    fresh = store.RunStore(tmp_path, {**settings, "epochs": 5}, fresh=True)
    fresh.check()
    assert fresh.finished() == {}
    assert (tmp_path / "runs" / "a-seed0.json").exists()  # until it starts
    fresh.start()
    assert list((tmp_path / "runs").iterdir()) == []
    assert json.loads((tmp_path / "settings.json").read_text())["epochs"] == 5


def test_atomic_write_leaves_the_old_file_whole_when_writing_fails(tmp_path):
    path = tmp_path / "results.json"
    store.write_json(path, {"old": True})

    def fail_midway(f):
        f.write(b'{"new": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.atomic_write(path, fail_midway)
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp left


def test_store_refuses_runs_without_their_settings(tmp_path):
    store.write_json(tmp_path / "runs" / "a-seed0.json", {"config": "a"})
    with pytest.raises(ValueError, match="settings are unknown"):
        store.RunStore(tmp_path, {"epochs": 4})


# --- the runner ----------------------------------------------------------------------


class _ToyExperiment:
    """Just enough of an experiment for the runner: two instant epochs per run."""

    def epochs(self, settings):
        return 2

    def train(self, settings, run, data, *, mesh=None, on_epoch=None):
        if run.config == "boom":
            raise RuntimeError(f"boom in {run.key}")
        for epoch in range(2):
            on_epoch(epoch, 0.5)
        return {
            "config": run.config,
            "seed": run.seed,
            "data": int(data["x"].sum()),
            "pid": os.getpid(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "toy_env": os.environ.get("TOY_ENV"),
        }


def test_runner_in_this_process_reports_each_run_in_order():
    runs = [Run("a", 0), Run("b", 0), Run("a", 1)]
    seen = []
    results = runner.run_all(
        _ToyExperiment(),
        None,
        runs,
        {"x": np.arange(4)},
        workers=1,
        on_result=lambda run, result: seen.append((run, result["config"])),
        show_progress=False,
    )
    assert [(r["config"], r["seed"]) for r in results] == [("a", 0), ("b", 0), ("a", 1)]
    assert seen == [(run, run.config) for run in runs]
    assert {r["pid"] for r in results} == {os.getpid()}
    assert runner.run_all(_ToyExperiment(), None, [], {}, workers=2) == []


@pytest.mark.slow
def test_runner_workers_are_other_processes_with_one_thread():
    runs = [Run("a", 0), Run("b", 0), Run("c", 0)]
    seen = []
    before = dict(os.environ)
    results = runner.run_all(
        _ToyExperiment(),
        None,
        runs,
        {"x": np.arange(4)},
        workers=2,
        on_result=lambda run, result: seen.append(run),
        show_progress=False,
        worker_env={"TOY_ENV": "set"},
    )
    assert [r["config"] for r in results] == ["a", "b", "c"]
    assert sorted(seen) == sorted(runs)  # each one, in this process
    assert all(r["data"] == 6 for r in results)
    pids = {r["pid"] for r in results}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert all(runner.ONE_THREAD in r["xla_flags"] for r in results)
    assert all(r["toy_env"] == "set" for r in results)
    assert dict(os.environ) == before


@pytest.mark.slow
def test_runner_raises_a_workers_error():
    runs = [Run("a", 0), Run("boom", 3)]
    with pytest.raises(RuntimeError, match="boom in boom-seed3"):
        runner.run_all(
            _ToyExperiment(),
            None,
            runs,
            {"x": np.arange(4)},
            workers=2,
            show_progress=False,
        )


# --- the dataset cache ------------------------------------------------------------


def test_dataset_is_generated_once_then_reused(tmp_path, monkeypatch):
    import mnist1d.data
    import requests

    def no_network(*args, **kwargs):
        raise AssertionError("the demo must never download MNIST-1D")

    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(mnist1d.data, "get_dataset", no_network)

    first, generated = demo_data.load(200, cache_dir=tmp_path)
    assert generated
    assert list(tmp_path.iterdir()) == [demo_data.cache_path(200, 42, tmp_path)]

    def must_not_generate(*args, **kwargs):
        raise AssertionError("the cached dataset was generated again")

    monkeypatch.setattr(demo_data, "generate", must_not_generate)
    second, generated = demo_data.load(200, cache_dir=tmp_path)
    assert not generated
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
        assert first[key].dtype == second[key].dtype


def test_standard_split_is_4000_and_1000(tmp_path):
    data, _ = demo_data.load(demo_data.STANDARD_SAMPLES, cache_dir=tmp_path)
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
    demo_data.generate(20, seed=7)
    assert np.random.random() == expected  # noqa: NPY002


def test_different_seeds_give_different_data():
    a = demo_data.generate(20, seed=1)
    b = demo_data.generate(20, seed=2)
    assert not np.array_equal(a["x_train"], b["x_train"])


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("OPTAX_WARMUP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_data.default_cache_dir() == tmp_path / "xdg" / "optax_warmup"
    monkeypatch.setenv("OPTAX_WARMUP_CACHE", str(tmp_path / "mine"))
    assert demo_data.default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("OPTAX_WARMUP_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert demo_data.default_cache_dir() == Path.home() / ".cache" / "optax_warmup"


@pytest.mark.parametrize("bad", [0, 15, 10, -20, 100.0, True, "200"])
def test_bad_num_samples_raise(bad, tmp_path):
    with pytest.raises(ValueError, match="num_samples"):
        demo_data.load(bad, cache_dir=tmp_path)


# --- pure helpers -----------------------------------------------------------------


def test_default_milestones_scale_goyals():
    assert flags.default_milestones(90) == (30.0, 60.0, 80.0)
    assert flags.default_milestones(30) == (10.0, 20.0, 27.0)
    assert flags.default_milestones(45) == (15.0, 30.0, 40.0)


def test_final_error_is_the_median_of_the_last_five_epochs():
    assert demo_stats.final_error([0.9, 0.1, 0.5, 0.4, 0.3, 0.2, 0.6]) == 0.4
    assert demo_stats.final_error([0.3, 0.1]) == pytest.approx(0.2)


def _welch_reference(a, b):
    """Welch's test by hand: t, ν, and p from Student's t density (Simpson's rule)."""
    na, nb = len(a), len(b)
    ma, mb = sum(a) / na, sum(b) / nb
    va = sum((x - ma) ** 2 for x in a) / (na - 1) / na
    vb = sum((x - mb) ** 2 for x in b) / (nb - 1) / nb
    t = abs(ma - mb) / math.sqrt(va + vb)
    nu = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    log_c = (
        math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
    )
    x = np.linspace(0.0, t, 20_001)
    density = np.exp(log_c - (nu + 1) / 2 * np.log1p(x**2 / nu))
    h = x[1] - x[0]
    inner = (
        h
        / 3
        * (
            density[0]
            + density[-1]
            + 4 * density[1:-1:2].sum()
            + 2 * density[2:-1:2].sum()
        )
    )
    return 1.0 - 2.0 * inner


@pytest.mark.parametrize(
    "a, b",
    [
        ([0.10, 0.12, 0.14], [0.15, 0.15, 0.15]),
        ([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0, 10.0]),
        ([0.0077, 0.0069, 0.0085], [0.0114, 0.0126, 0.0102]),
        (
            list(np.random.default_rng(0).normal(0, 1, 7)),
            list(np.random.default_rng(1).normal(0.8, 3, 4)),
        ),
    ],
)
def test_welch_p_value_matches_an_independent_reference(a, b):
    from scipy import stats

    p = demo_stats.welch_p_value(a, b)
    assert p == pytest.approx(_welch_reference(a, b), rel=1e-7, abs=1e-12)
    with warnings.catch_warnings():  # scipy warns about a constant side
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = stats.ttest_ind(a, b, equal_var=False).pvalue
    assert p == pytest.approx(expected, rel=1e-9)
    assert demo_stats.welch_p_value(b, a) == pytest.approx(p, rel=1e-12)  # two-sided


def test_welch_p_value_is_undefined_without_two_values_a_side():
    assert demo_stats.welch_p_value([0.1], [0.2, 0.3]) is None
    assert demo_stats.welch_p_value([0.1, 0.2], [0.3]) is None
    assert demo_stats.welch_p_value([0.1, 0.1], [0.1, 0.1]) is None  # t = 0/0
    assert demo_stats.welch_p_value([0.1, 0.1], [0.2, 0.2]) == 0.0  # |t| = ∞
    assert report.p_cell(None) == "–"


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
    exp = experiment.Settings(small_batch=32, large_batch=512, lr=0.05)
    runs = _fake_runs(
        {
            "reference": [0.10, 0.12, 0.14],
            "no_warmup": [0.20, 0.22, 0.90],
            "constant_warmup": [0.15, 0.15, 0.15],
            "gradual_warmup": [0.11, 0.12, 0.13],
        }
    )
    summary = experiment.summarize(runs, exp)
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
    # Welch: t = 0.03 / (0.02/√3) and ν = 2 for a constant side against 3 values.
    constant_p = summary["constant_warmup"]["p_value"]
    assert constant_p == pytest.approx(
        _welch_reference([0.15] * 3, [0.10, 0.12, 0.14]), rel=1e-7
    )
    assert ref["p_value"] is None
    assert gradual["p_value"] == pytest.approx(1.0)  # the same mean

    # The shift: constant − reference is {0.05, 0.03, 0.01}, thrice; 3 seeds a
    # side at 90% give the extreme differences as the interval (k = 1).
    assert summary["constant_warmup"]["shift_vs_reference"] == {
        "estimate": pytest.approx(0.03),
        "low": pytest.approx(0.01),
        "high": pytest.approx(0.05),
        "coverage": pytest.approx(0.9),
        "p_value": pytest.approx(0.1),  # every pair above: 2 · 1/20
    }
    assert "shift_vs_reference" not in ref

    table = experiment.markdown_table(summary).splitlines()
    assert len(table) == 2 + 4
    assert "| 12.00 ± 2.00 |" in table[2]
    assert "(1 diverged)" in table[3]
    assert "| +3.00 [+1.00, +5.00] |" in table[4]
    assert table[0].split(" | ")[4] == "shift vs reference (pp), 90% interval"
    assert table[0].split(" | ")[5] == "p vs reference"
    assert [row.split(" | ")[5] for row in table[2:]] == [
        "–",
        "0.100",  # no warmup: every pair above the reference
        "0.100",
        "1.000",
    ]


def _findings(errors: dict[str, list[float]]) -> dict[str, str]:
    summary = experiment.summarize(_fake_runs(errors), experiment.Settings())
    return {f.claim: f.verdict for f in experiment.findings(summary)}


SIX_SEEDS = {
    "reference": [0.0070, 0.0073, 0.0075, 0.0062, 0.0093, 0.0071],
    "no_warmup": [0.0127, 0.0088, 0.0113, 0.0298, 0.0127, 0.0110],
    "constant_warmup": [0.49, 0.49, 0.088, 0.19, 0.30, 0.20],
    "gradual_warmup": [0.0083, 0.0092, 0.0098, 0.0082, 0.0085, 0.0090],
}


def test_findings_of_goyals_table_1_hold_on_six_clear_seeds():
    verdicts = _findings(SIX_SEEDS)
    assert list(verdicts.values()) == ["holds"] * 4
    assert "kn with gradual warmup ends at most 0.3 pp above the reference" in verdicts


def test_a_finding_fails_when_its_interval_is_on_the_other_side():
    errors = dict(SIX_SEEDS)
    errors["gradual_warmup"] = [e + 0.006 for e in SIX_SEEDS["reference"]]
    verdicts = _findings(errors)
    assert verdicts[
        "kn with gradual warmup ends at most 0.3 pp above the reference"
    ] == ("fails")
    # about as bad as no warmup: neither shown below it nor above it
    assert verdicts["kn with gradual warmup ends below kn without warmup"] == (
        "not shown"
    )


def test_how_far_one_seed_lands_cannot_move_a_finding_with_six_seeds():
    # The worst gradual-warmup seed lands on a bad minimum, at 5% or at 50%: with
    # 6 seeds its differences are beyond both ends of every interval, so the
    # intervals and verdicts are the same; with 5 the far seed's own difference
    # is an end, which grows with it.
    def shifts(errors):
        summary = experiment.summarize(_fake_runs(errors), experiment.Settings())
        return [(f.verdict, f.shift) for f in experiment.findings(summary)]

    def with_far_seed(far, seeds):
        gradual = [*SIX_SEEDS["gradual_warmup"][:2], far, 0.0082, 0.0085, 0.0090]
        return {
            **{k: v[:seeds] for k, v in SIX_SEEDS.items()},
            "gradual_warmup": gradual[:seeds],
        }

    assert shifts(with_far_seed(0.05, 6)) == shifts(with_far_seed(0.5, 6))
    five = [shifts(with_far_seed(far, 5))[2][1].high for far in (0.05, 0.5)]
    assert five[1] > five[0] > experiment.TOLERANCE
    assert shifts(with_far_seed(0.05, 6))[2][1].high < experiment.TOLERANCE


def test_findings_need_enough_seeds_and_their_configurations():
    two = {k: v[:2] for k, v in SIX_SEEDS.items()}
    assert set(_findings(two).values()) == {"not shown"}  # no 90% interval
    only = {k: SIX_SEEDS[k] for k in ("reference", "no_warmup")}
    assert list(_findings(only)) == ["kn without warmup ends above the reference"]


def test_an_end_on_the_bound_counts_against_the_finding():
    # Errors on the test set's grid: 48/6000 − 30/6000 is 0.003 to the last bit
    # and 49/6000 − 31/6000 is 0.002999…9; both are on the bound.
    for shifted in (30, 31):
        errors = {
            "reference": [shifted / 6000] * 3,
            "gradual_warmup": [(shifted + 18) / 6000] * 3,
        }
        verdict = _findings(errors)
        assert verdict == {
            "kn with gradual warmup ends at most 0.3 pp above the reference": "fails"
        }


def test_summary_json_has_no_infinity():
    summary = experiment.summarize(
        _fake_runs({"reference": [0.1], "no_warmup": [0.2]}), experiment.Settings()
    )
    stored = summary["no_warmup"]["shift_vs_reference"]
    assert stored["low"] is None and stored["high"] is None
    json.dumps(summary, allow_nan=False)
    assert "[–, –]" in experiment.markdown_table(summary)


def test_notes_print_the_verdicts():
    summary = experiment.summarize(_fake_runs(SIX_SEEDS), experiment.Settings())
    lines = experiment.notes(summary)
    assert "Mann–Whitney" in lines[0]
    assert lines[1].startswith("Goyal et al.'s Table 1 on these seeds")
    assert [line.split()[0] for line in lines[2:]] == ["holds"] * 4


def test_the_default_run_has_the_seeds_its_findings_need():
    assert experiment.DEFAULT_SEEDS == 6
    assert main_parse([])[1].seeds == 6
    assert main_parse(["--quick"])[1].seeds == 1


def test_peak_rate_is_the_linear_scaling_rule():
    settings = experiment.Settings(small_batch=16, large_batch=400, lr=0.3)
    assert settings.peak_lr("reference") == 0.3
    assert settings.peak_lr("gradual_warmup") == ow.linear_scaling_rule(0.3, 400, 16)
    assert settings.peak_lr("gradual_warmup") == pytest.approx(7.5)


# --- the command line -------------------------------------------------------------


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
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
        "--fresh",
        "--experiment",
    ):
        assert flag in text


@pytest.fixture(scope="module")
def flag_cache(tmp_path_factory):
    """A dataset cache shared by the command-line tests (2000 samples, generated)."""
    cache = tmp_path_factory.mktemp("flag-cache")
    demo_data.load(2000, cache_dir=cache)
    return cache


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
        main([*argv, "--cache-dir", str(tmp_path), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    "argv, flag, detail",
    [
        (["--out", "/proc/x"], "--out", "cannot write to /proc/x"),
        (["--cache-dir", "/proc/x"], "--cache-dir", "cannot use /proc/x"),
        (["--widths", "8,x"], "--widths", "comma-separated integers, got '8,x'"),
        (["--widths", "8,16"], "--widths", "three positive widths"),
        (["--widths", "8,0,8"], "--widths", "three positive widths"),
        (["--milestones", "2,x"], "--milestones", "comma-separated numbers"),
        (["--milestones", "40", "--epochs", "4"], "--milestones", "end of training"),
        (["--milestones", "2,4", "--epochs", "4"], "--milestones", "end of training"),
        (["--epochs", "2"], "--milestones", "(the default for --epochs 2)"),
        (["--milestones=-1,2", "--warmup-epochs", "0"], "--milestones", "> 0"),
        (["--warmup-epochs", "-1"], "--warmup-epochs", ">= 0"),
        (["--warmup-epochs", "nan"], "--warmup-epochs", "finite"),
        (["--lr", "-0.1"], "--lr", "base_lr must be >= 0"),
        (["--lr", "inf"], "--lr", "finite"),
        (["--lr", "x"], "--lr", "invalid float value"),
        (["--weight-decay", "-1"], "--weight-decay", ">= 0"),
        (["--label-smoothing", "1.5"], "--label-smoothing", "[0, 1]"),
        (["--label-smoothing", "nan"], "--label-smoothing", "[0, 1]"),
        (["--small-batch", "0"], "--small-batch", "at least 1"),
        (["--large-batch", "0"], "--large-batch", "at least 1"),
        (["--large-batch", "48"], "--large-batch", "not a multiple of --small-batch"),
        (["--large-batch", "2048"], "--large-batch", "exceeds the 1600 training"),
        (["--epochs", "1.5"], "--epochs", "invalid int value"),
        (["--seeds", "0"], "--seeds", "at least 1"),
        (["--workers", "0"], "--workers", "at least 1"),
        (["--samples", "2005"], "--samples", "multiple of 10"),
        (["--samples", "10"], "--samples", ">= 20"),
        (["--experiment", "nope"], "--experiment", "invalid choice"),
        (["--replot", "/proc/x"], "--replot", "cannot read /proc/x/results.json"),
        (["--bogus"], "unrecognized arguments", "--bogus"),
    ],
)
def test_bad_flags_are_one_line_errors_naming_the_flag(
    argv, flag, detail, flag_cache, tmp_path, capsys
):
    out = tmp_path / "out"
    base = ["--samples", "2000", "--cache-dir", str(flag_cache), "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main([*base, *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: python -m optax_warmup.demo")
    line = err[-1]
    assert line.startswith(PROG_ERROR), line
    assert flag in line and detail in line, line
    assert not (out / "settings.json").exists() and not (out / "runs").exists()


def test_replot_of_a_directory_without_a_report_is_refused(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(SystemExit) as exit_info:
        main(["--replot", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "argument --replot:" in capsys.readouterr().err
    assert not (tmp_path / "table.md").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--out", "/proc/x"], "argument --out: cannot write to /proc/x"),
        (["--widths", "8,x"], "argument --widths: expected comma-separated"),
        (["--milestones", "40", "--epochs", "4"], "argument --milestones:"),
    ],
)
def test_a_user_sees_no_traceback(flags, expected, flag_cache):
    done = subprocess.run(
        [*PROG, "--samples", "2000", "--cache-dir", str(flag_cache), *flags],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(PROG_ERROR + expected)
    assert done.stdout == ""


# --- several devices: the batch is sharded, the result is the same -----------------

_SHARDED = """
import json, sys
import jax
from optax_warmup.demo import data, training, warmup as W
assert jax.device_count() == 2, jax.devices()
arrays, _ = data.load(400, cache_dir=sys.argv[1])
exp = W.Settings(small_batch=16, large_batch=64, epochs=2, warmup_epochs=1.0,
                 milestones=(1.5,), widths=(4, 8, 8))
one = W.train_run(exp, "gradual_warmup", 0, arrays,
                  mesh=training.data_mesh(jax.devices()[:1]))
two = W.train_run(exp, "gradual_warmup", 0, arrays)
print(json.dumps({"one": one["train_loss"], "two": two["train_loss"],
                  "err1": one["test_error"], "err2": two["test_error"]}))
"""


@pytest.mark.slow
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
