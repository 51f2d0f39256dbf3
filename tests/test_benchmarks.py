"""Tests of the benchmark runner, ``benchmarks/run_all.py``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]


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


def _load_gpu_run():
    spec = importlib.util.spec_from_file_location(
        "gpu_run", ROOT / "benchmarks" / "gpu_run.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_TINY = '''
"""Tiny thing against nothing."""
def main(quick=False):
    print("| a | b |")
    print("|---|---|")
    print(f"| 1 | {quick} |")
    return {"ratio": 0.5, "quick": quick}
'''

_SLEEPY = '''
"""Sleeps past any budget."""
import time
def main(quick=False):
    print("sleeping", flush=True)
    time.sleep(600)
'''


def _gpu_run(tmp_path, *args):
    """Runs benchmarks/gpu_run.py as a user would; returns (status, out, stdout)."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env.pop("OUT", None)
    script = str(ROOT / "benchmarks" / "gpu_run.py")
    done = subprocess.run(
        [sys.executable, script, "--out", str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return done.returncode, out, done.stdout + done.stderr


@pytest.mark.slow
def test_gpu_run_dry_run_writes_the_report_of_benchmarks_and_demo(tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "tiny.py").write_text(_TINY)
    status, out, output = _gpu_run(tmp_path, "--dry-run", "--bench-dir", str(scripts))
    assert status == 0, output
    assert sorted(p.name for p in out.iterdir()) == [
        "cpu-cpu-dry-run.json",
        "cpu-cpu-dry-run.md",
        "log.txt",
    ]
    report = json.loads((out / "cpu-cpu-dry-run.json").read_text())
    assert report["dry_run"] and report["quick"]
    assert report["environment"]["backend"] == "cpu"
    assert report["host"]["nvidia_smi"] is None or isinstance(
        report["host"]["nvidia_smi"], list
    )
    assert report["host"]["versions"]["jax"] == jax.__version__
    tiny = report["benchmarks"]["tiny"]
    assert tiny["ok"] and tiny["result"] == {"ratio": 0.5, "quick": True}
    demo = report["demo"]
    assert demo["ok"] and not demo["timed_out"], output
    assert demo["results"]["experiment"]["epochs"] == 2
    assert len(demo["results"]["runs"]) == len(demo["results"]["summary"]) == 4
    md = (out / "cpu-cpu-dry-run.md").read_text()
    assert "| tiny | Tiny thing against nothing. | ok |" in md
    assert "| 1 | True |" in md
    assert "### demo --quick" in md and demo["table"].strip() in md
    assert "MNIST-1D" in (out / "log.txt").read_text()  # the children's output


@pytest.mark.slow
def test_gpu_run_stops_a_benchmark_that_runs_past_its_budget(tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "sleepy.py").write_text(_SLEEPY)
    status, out, output = _gpu_run(
        tmp_path, "--bench-dir", str(scripts), "--no-demo", "--budget-s", "20"
    )
    assert status == 1, output
    report = json.loads(next(out.glob("cpu-cpu.json")).read_text())
    sleepy = report["benchmarks"]["sleepy"]
    assert not sleepy["ok"] and sleepy["error"].startswith("timed out after")
    assert 15 < sleepy["seconds"] < 60 and report["demo"] is None


def test_gpu_run_refuses_bad_arguments(tmp_path, capsys):
    gpu_run = _load_gpu_run()
    for argv, message in (
        (["--out", str(tmp_path), "--budget-s", "0"], "--budget-s must be positive"),
        (["--out", str(tmp_path), "--only", "nope"], "no benchmark script named"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            gpu_run.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_gpu_run_is_not_run_by_run_all():
    names = [p.name for p in _load_run_all().discover()]
    assert "gpu_run.py" not in names
    assert {"label_smoothing.py", "goyal_sgd_step.py"} <= set(names)


def _load_script(name):
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_label_smoothing_sizes_per_backend():
    script = _load_script("label_smoothing")
    cpu = script.plan(quick=False, backend="cpu")
    assert cpu["shapes"] == [(4096, 32000), (2048, 128256)]
    assert cpu["dtypes"] == ["float32"] and cpu["calls"] == 1
    assert cpu["at_least"] == {} and cpu["targets"]["time_vs_integer"] == 1.1
    quick = script.plan(quick=True, backend="cpu")
    assert quick["dtypes"] == ["float32", "bfloat16"]
    assert max(b * k for b, k in quick["shapes"]) <= 2**20
    gpu = script.plan(quick=False, backend="gpu")
    assert gpu["shapes"] == cpu["shapes"] and gpu["dtypes"] == quick["dtypes"]
    assert gpu["calls"] > 1 and gpu["at_least"] == {"bandwidth_fraction": 0.6}
    assert gpu["targets"]["time_vs_integer"] == 1.05
    assert gpu["targets"]["time_vs_one_hot"] == 0.5


def test_imagenet_sized_step_is_skipped_on_cpu_unless_quick():
    script = _load_script("goyal_sgd_step")
    skipped = script.imagenet_step(quick=False, backend="cpu")
    assert set(skipped) == {"skipped"} and "ResNet-50" in skipped["skipped"]
