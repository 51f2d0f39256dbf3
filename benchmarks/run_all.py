"""Runs every benchmark script and writes one JSON file and one Markdown table.

``python benchmarks/run_all.py [--quick]`` runs each ``benchmarks/*.py`` (all but
``_common.py``, this file and ``gpu_run.py``, which runs this one on an accelerator
host) in its own Python process, so that one benchmark's
compiled programs and memory never weigh on the next, by calling the script's
``main(quick=...) -> dict``. It writes ``benchmarks/results/<backend>-<device>.json``
(``-quick`` before the suffix for a quick run) with the environment and every
script's returned dict, and the Markdown next to it (``.md``, also printed): a
summary table of the scripts, then the tables that each script printed. A script
that fails is recorded with its error, the others still run, and the exit status is
1. The same command runs on CPU, GPU and TPU hosts; on a GPU the runner itself does
not preallocate device memory (``XLA_PYTHON_CLIENT_PREALLOCATE=false``), so that
the scripts, which run with the environment it was given, have the device to
themselves.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import RESULTS_DIR, device_tag, environment  # noqa: E402

SKIP = {"_common.py", "gpu_run.py", Path(__file__).name}

# Imports the script as a module, calls main(quick), and writes its dict as JSON.
_CHILD = """
import importlib.util, json, sys
path, quick, out = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
sys.path.insert(0, str(__import__("pathlib").Path(path).parent))
spec = importlib.util.spec_from_file_location("benchmark_script", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
result = module.main(quick=quick)
with open(out, "w") as f:
    json.dump(result, f, default=repr)
"""


def discover(directory: Path = HERE) -> list[Path]:
    """The benchmark scripts of ``directory``, sorted by name."""
    return sorted(p for p in directory.glob("*.py") if p.name not in SKIP)


def summary_line(path: Path) -> str:
    """The first line of a script's module docstring (what it compares)."""
    doc = ast.get_docstring(ast.parse(path.read_text()))
    return doc.strip().splitlines()[0].replace("``", "`") if doc else ""


def markdown_tables(text: str) -> list[str]:
    """The Markdown tables (runs of lines that start with ``|``) printed in ``text``."""
    tables, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.lstrip().startswith("|"):
            current.append(line.strip())
        elif current:
            tables.append("\n".join(current))
            current = []
    return tables


def run_script(
    path: Path, quick: bool, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Runs one script in a child process; its output is shown as it comes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-c", _CHILD, str(path), "1" if quick else "0"]
        start = time.perf_counter()
        lines = []
        with subprocess.Popen(
            [*command, str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        ) as child:
            assert child.stdout is not None
            for line in child.stdout:
                print(line, end="", flush=True)
                lines.append(line)
        status = child.returncode
        output = "".join(lines)
        entry: dict[str, Any] = {
            "script": path.name,
            "what": summary_line(path),
            "seconds": time.perf_counter() - start,
            "ok": status == 0 and out.exists(),
            "tables": markdown_tables(output),
        }
        if entry["ok"]:
            entry["result"] = json.loads(out.read_text())
        else:
            tail = output.strip().splitlines()[-1:] or [f"exit status {status}"]
            entry["error"] = tail[0]
        return entry


def markdown(report: dict[str, Any]) -> str:
    """The summary table, then each script's own tables."""
    env = report["environment"]
    lines = [
        f"Benchmarks on {env['backend']} ({env['device']} ×{env['device_count']}, "
        f"{env['cpu_count']} CPUs, {env['machine']}), jax {env['jax']}, optax "
        f"{env['optax']}, flax {env['flax']}, Python {env['python']}"
        + (" — quick run (small shapes, not for quoting)" if report["quick"] else ""),
        "",
        "| benchmark | what it measures | status | wall (s) |",
        "|---|---|---|---:|",
    ]
    for name, entry in report["benchmarks"].items():
        status = "ok" if entry["ok"] else f"failed: {entry['error']}"
        lines.append(
            f"| {name} | {entry['what']} | {status} | {entry['seconds']:.0f} |"
        )
    for name, entry in report["benchmarks"].items():
        if entry["tables"]:
            lines += ["", f"### {name}", ""]
            lines += ["\n\n".join(entry["tables"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="pass quick=True to every script"
    )
    parser.add_argument(
        "--only", nargs="+", default=None, help="run only these scripts (names)"
    )
    parser.add_argument(
        "--dir", type=Path, default=HERE, help="where the scripts are (default: here)"
    )
    parser.add_argument(
        "--results-dir", type=Path, default=RESULTS_DIR, help="where to write"
    )
    args = parser.parse_args(argv)
    scripts = discover(args.dir)
    if args.only:
        wanted = {name.removesuffix(".py") for name in args.only}
        unknown = wanted - {p.stem for p in scripts}
        if unknown:
            parser.error(f"no benchmark script named {sorted(unknown)}")
        scripts = [p for p in scripts if p.stem in wanted]
    # The scripts get the environment as given; this process only asks JAX which
    # device it is on, and must not hold the device memory that they need.
    child_env = dict(os.environ)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    report: dict[str, Any] = {
        "command": [
            "python",
            "benchmarks/run_all.py",
            *(sys.argv[1:] if argv is None else argv),
        ],
        "quick": args.quick,
        "environment": environment(),
        "benchmarks": {},
    }
    for path in scripts:
        print(f"=== {path.stem} ===", flush=True)
        report["benchmarks"][path.stem] = run_script(path, args.quick, child_env)

    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = device_tag() + ("-quick" if args.quick else "")
    json_path = args.results_dir / f"{stem}.json"
    md_path = args.results_dir / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2, default=repr) + "\n")
    table = markdown(report)
    md_path.write_text(table)
    print("\n" + table)
    print(f"wrote {json_path} and {md_path}")
    return 0 if all(e["ok"] for e in report["benchmarks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
