"""Tests of the benchmark runner, ``benchmarks/run_all.py``."""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path

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
