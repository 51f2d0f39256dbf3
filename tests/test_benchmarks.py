"""Tests of the benchmark runner, ``benchmarks/run_all.py``."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import statistics
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


# _common's statistics: medians and ratios from the same rounds, bootstrap
# intervals with a fixed seed, and verdicts that a noisy ratio cannot pass.


def _load_common():
    return _load_script("_common")


def test_bootstrap_interval_is_reproducible_and_narrows_with_more_rounds():
    common = _load_common()
    rng = random.Random(1)
    few = [1.0 + rng.gauss(0, 0.05) for _ in range(10)]
    many = [1.0 + rng.gauss(0, 0.05) for _ in range(400)]
    low, high = common.bootstrap_interval(few)
    assert common.bootstrap_interval(few) == [low, high]  # fixed seed
    assert low <= statistics.median(few) <= high
    low_many, high_many = common.bootstrap_interval(many)
    assert high_many - low_many < high - low
    assert common.bootstrap_interval([0.5]) == [0.5, 0.5]


@pytest.mark.parametrize(
    ("interval", "at_least", "word"),
    [
        ((0.98, 1.01), False, "met"),
        ((1.03, 1.10), False, "missed"),
        ((0.99, 1.04), False, "not resolved"),
        ((1.00, 1.02), False, "not resolved"),  # touching the target: not under it
        ((0.65, 0.70), True, "met"),
        ((0.40, 0.55), True, "missed"),
        ((0.55, 0.65), True, "not resolved"),
    ],
)
def test_a_target_is_met_only_when_the_whole_interval_is_on_its_side(
    interval, at_least, word
):
    target = 0.6 if at_least else 1.02
    assert _load_common().verdict(interval, target, at_least=at_least) == word


def test_compare_takes_medians_and_ratio_from_the_same_rounds():
    common = _load_common()
    base = [1.0, 2.0, 3.0, 10.0]  # a slow spell in round 3 hits both sides
    ours = [1.1, 2.2, 3.3, 11.0]
    c = common.compare(base, ours)
    assert c["rounds"] == 4
    assert c["ratio"] == pytest.approx(1.1)
    assert c["ratio_interval"] == pytest.approx([1.1, 1.1])
    assert c["median_s"] == pytest.approx(2.75) and c["base_median_s"] == 2.5
    with pytest.raises(ValueError, match="rounds"):
        common.compare([1.0], [1.0, 2.0])


def test_interleaved_times_alternates_the_order_of_a_pair():
    common = _load_common()
    calls = []
    candidates = {
        "a": (lambda: calls.append("a"), ()),
        "b": (lambda: calls.append("b"), ()),
        "c": (lambda: calls.append("c"), ()),
    }
    times = common.interleaved_times({k: candidates[k] for k in "ab"}, rounds=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    calls.clear()
    common.interleaved_times(candidates, rounds=3)
    assert calls == list("abcbcacab")


def _compared(ratio, low, high, ms=10.0):
    return {
        "rounds": 6,
        "ratio": ratio,
        "ratio_interval": [low, high],
        "median_s": ms * ratio / 1e3,
        "base_median_s": ms / 1e3,
        "difference_s": ms * (ratio - 1) / 1e3,
        "difference_interval_s": [ms * (low - 1) / 1e3, ms * (high - 1) / 1e3],
    }


def test_recipes_table_shows_intervals_the_control_and_plain_verdicts(capsys):
    script = _load_script("recipes")
    compared = {
        "sgd": _compared(0.99, 0.98, 1.01),
        "lars": _compared(1.05, 1.03, 1.08),
        "lamb": _compared(1.01, 0.99, 1.04),
        "control": _compared(1.00, 0.97, 1.04),
    }
    script.print_table(
        {
            "model": "tiny",
            "parameters": 10,
            "batch_shape": [2, 8, 8, 3],
            "load_average_1min": [0.1, 0.2],
            "pairs": 6,
            "compared_to_optax": compared,
            "target_ratio": 1.02,
            "verdict": {"sgd": "met", "lars": "missed", "lamb": "not resolved"},
            "schedule_hlo_ops": {},
            "train_step_hlo_ops_compiled": {n: {"ow": 1, "optax": 2} for n in compared},
        }
    )
    rows = {
        line.split(" | ")[0][2:]: line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| ")
    }
    assert rows["sgd"].endswith("| 0.990 [0.980, 1.010] | -0.10 | 1 / 2 | met |")
    assert rows["lars"].endswith("| **missed** |")
    assert rows["lamb"].endswith("| not resolved |")
    assert "1.000 [0.970, 1.040]" in rows["control: optax sgd / itself"]
    # The medians beside the ratio are those of the same pairs.
    assert "| 9.90 | 10.00 |" in rows["sgd"]


def test_goyal_sgd_step_table_marks_the_control_and_the_verdict(capsys):
    script = _load_script("goyal_sgd_step")
    names = [script.BASE, "ow.goyal_sgd", "optax chain (join_schedules)"]
    result = {
        "model": "ResNet",
        "parameters": 10,
        "batch_shape": [2, 8, 8, 3],
        "load_average_1min": [0.1, 0.2],
        "pairs": 6,
        "first_call_s": dict.fromkeys(names, 1.0),
        "compared_to_sgd_constant": {
            script.BASE: _compared(1.0, 0.96, 1.05),
            "ow.goyal_sgd": _compared(1.0, 0.98, 1.03),
            "optax chain (join_schedules)": _compared(1.01, 0.99, 1.04),
        },
        "target_ratio": 1.02,
        "verdict": "not resolved",
        "train_step_hlo_ops_added_vs_sgd_constant": dict.fromkeys(names, 0),
        "schedule_hlo_ops": {},
        "imagenet_step": {"skipped": "no accelerator"},
    }
    script.print_table(result)
    out = capsys.readouterr().out
    assert (
        "| optax.sgd(constant) (control: against itself) | 10.00 | 1.00 "
        "| 1.000 [0.960, 1.050] |" in out
    )
    assert (
        "| ow.goyal_sgd | 10.00 | 1.00 | 1.000 [0.980, 1.030] | 0.00 | 0 "
        "| not resolved |" in out
    )
    assert "bootstrap interval" in out


def test_noise_scale_table_has_the_control_row(capsys):
    script = _load_script("noise_scale")
    script.print_table(
        {
            "model": "SmallResNet1D",
            "parameters": 10,
            "batch": 1024,
            "groups": 32,
            "load_average_1min": [0.1, 0.2],
            "pairs": 6,
            "compared_to_plain": {
                "tracked": _compared(1.3, 1.25, 1.36),
                "control": _compared(1.0, 0.97, 1.02),
            },
            "target_ratio": 1.2,
            "verdict": "missed",
            "train_step_hlo_ops_compiled": {"plain": 4, "tracked": 5},
        }
    )
    out = capsys.readouterr().out
    assert (
        "| noise scale tracked, kn=1024 | 10.00 | 13.00 | 1.300 [1.250, 1.360] "
        "| 3.00 | 5 / 4 | **missed** |" in out
    )
    assert "| control: plain / itself, kn=1024 |" in out


def test_label_smoothing_ratios_and_verdicts_come_from_the_same_rounds(capsys):
    script = _load_script("label_smoothing")
    rounds = {  # a slow round (the last) hits every candidate alike
        "ours": [1.0, 1.0, 1.0, 3.0],
        "one_hot": [4.0, 4.0, 4.0, 12.0],
        "integer": [1.0, 0.9, 0.95, 3.0],
    }
    times = {
        name: {
            "first_call_s": 1.0,
            "rounds_s": r,
            "median_s": statistics.median(r),
            "cpu_rounds_s": r,
            "cpu_s": statistics.median(r),
        }
        for name, r in rounds.items()
    }
    run = script.plan(quick=False, backend="cpu") | {"cpu": True}
    memory = {"ours": 1, "one_hot": 100, "integer": 1}
    entry = script.compare_losses(times, memory, 0.5, run)
    assert entry["time_vs_one_hot"] == pytest.approx(0.25)
    assert entry["ratios"]["time_vs_one_hot"]["ratio_interval"] == pytest.approx(
        [0.25, 0.25]
    )
    assert entry["verdicts"] == {
        "memory_vs_one_hot": "met",
        "time_vs_one_hot": "met",
        "time_vs_integer": "not resolved",  # 1, 1.11, 1.05, 1 against ≤ 1.1
    }
    script.print_table(
        {
            "rounds": 4,
            "results": [
                {
                    "shape": [4, 8],
                    "dtype": "float32",
                    "forward": entry,
                    "forward_backward": entry,
                }
            ],
        }
    )
    out = capsys.readouterr().out
    assert "| 0.25 [0.25, 0.25] |" in out
    assert "memory met, vs one-hot met, vs integer not resolved |" in out


def test_accumulation_table_has_the_control_and_a_verdict_per_claim(capsys):
    script = _load_script("accumulation")
    memory = {"argument_bytes": 2**20, "output_bytes": 2**20, "temp_bytes": 0}
    compared = {
        "control: MultiSteps / itself": _compared(1.0, 0.98, 1.03),
        "accumulate / MultiSteps": {
            **_compared(0.9, 0.85, 0.95),
            "verdict": "met",
        },
        "norms on / off": {**_compared(1.04, 1.01, 1.07), "verdict": "not resolved"},
        "AdaScale / plain": {**_compared(1.2, 1.1, 1.3), "verdict": "missed"},
    }
    script.print_table(
        {
            "rows": [
                {
                    "model": "WideMLP",
                    "parameters": 1000,
                    "donated": True,
                    "micro_steps_per_update": 8,
                    "compared_to": compared,
                    "memory": {"multisteps": memory, "accumulate": memory},
                }
            ],
            "target_ratio": 1.05,
            "pairs": 40,
            "load_average_1min": [0.1, 0.2],
        }
    )
    out = capsys.readouterr().out
    assert (
        "| WideMLP (1,000) | yes | 1.000 [0.980, 1.030] | 0.900 [0.850, 0.950] met "
        "| 1.040 [1.010, 1.070] not resolved | 1.200 [1.100, 1.300] **missed** |"
    ) in out
    assert "| WideMLP | yes | argument | 1.00 | 1.00 |" in out
