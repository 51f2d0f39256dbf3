"""One run on an accelerator host: every benchmark, then the demo's ``--quick``.

``python benchmarks/gpu_run.py --out DIR`` runs each benchmark script of
``benchmarks/`` (through ``run_all.py --only NAME``, each in its own process, so one
that fails or runs out of time leaves the others' results), then
``python -m optax_warmup.demo --quick``, and writes to ``DIR``:

- ``<backend>-<device>.json``: the host (``nvidia-smi``'s device, driver and memory;
  the versions of Python, jax, jaxlib, its CUDA plugin, optax, flax, chex, torch),
  every benchmark's entry as ``run_all.py`` records it, and the demo's results;
- ``<backend>-<device>.md``: ``run_all.py``'s summary and tables, then the demo's
  table;
- ``log.txt``: everything the children printed.

Both files are rewritten after each step, so a run cut short keeps what finished.
The whole run keeps to ``--budget-s`` seconds (default 420): each benchmark gets the
time left less what the demo needs, and a child that passes its time is stopped (its
whole process group) and recorded as timed out.

``--dry-run`` is the same run at the benchmarks' ``--quick`` sizes and a demo of two
short epochs, with ``-dry-run`` in the file names: it runs on a CPU in minutes and
writes files of the same shape (the tests run it with ``--bench-dir`` pointing at a
tiny script).

On a GPU host without network access whose Python 3.12 has JAX with CUDA, flax,
optax, chex, torch, scipy, tqdm and matplotlib but not mnist1d (the demo's data),
download the wheel beforehand into an ignored ``.whl/`` folder of the repository
(``echo /.whl/ >> .git/info/exclude``, then ``python3 -m pip download --no-deps
--only-binary=:all: --python-version 3.12 -d .whl mnist1d==0.0.2.post1``), send
it along with the working tree (a remote-run tool's ``carry=[".whl"]``; allow it
``timeout_s=540``), and run from the repository root, with ``$OUT`` the folder
that comes back::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir
    --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
    PYTHONUNBUFFERED=1 || exit; python3 benchmarks/gpu_run.py --out $OUT

(one line). Copy the JSON and Markdown it returns to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import run_all  # noqa: E402
from _common import device_tag, environment  # noqa: E402

DEMO_SECONDS = 150  # what the demo's --quick is given (about a minute on a GPU)
DEMO_DRY_RUN = [
    "--samples",
    "1000",
    "--epochs",
    "2",
    "--warmup-epochs",
    "0.5",
    "--milestones",
    "1",
    "--large-batch",
    "64",
    "--workers",
    "1",
]
PACKAGES = [
    "jax",
    "jaxlib",
    "jax-cuda13-plugin",
    "jax-cuda12-plugin",
    "optax",
    "flax",
    "chex",
    "numpy",
    "torch",
    "mnist1d",
    "scipy",
    "matplotlib",
    "tqdm",
]


def versions() -> dict[str, str | None]:
    """The installed version of each package of ``PACKAGES`` (None: not installed)."""
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def nvidia_smi() -> list[dict[str, str]] | None:
    """Each GPU's name, driver, memory and maximum SM clock; None without nvidia-smi."""
    fields = ["name", "driver_version", "memory.total", "clocks.max.sm"]
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(
        [
            "nvidia-smi",
            f"--query-gpu={','.join(fields)}",
            "--format=csv,noheader",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return None
    return [
        dict(zip(fields, (v.strip() for v in line.split(",")), strict=False))
        for line in done.stdout.strip().splitlines()
    ]


def run_child(
    command: list[str], timeout: float, log: IO[str], env: dict[str, str]
) -> dict[str, Any]:
    """Runs ``command``, echoing its output to stdout and ``log``, within ``timeout``.

    The child gets a process group of its own, and the whole group is stopped when
    the time is up, so that no grandchild keeps the accelerator busy.
    """
    start = time.perf_counter()
    child = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    assert child.stdout is not None
    stream = child.stdout

    def echo() -> None:
        for line in stream:
            print(line, end="", flush=True)
            log.write(line)
            log.flush()

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    timed_out = False
    try:
        child.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    reader.join(timeout=10)
    return {
        "command": command,
        "seconds": time.perf_counter() - start,
        "returncode": child.returncode,
        "timed_out": timed_out,
    }


def run_benchmark(
    name: str,
    args: argparse.Namespace,
    timeout: float,
    log: IO[str],
    env: dict[str, str],
) -> dict[str, Any]:
    """One benchmark script through ``run_all.py --only``: its run_all entry."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, str(HERE / "run_all.py"), "--only", name]
        command += ["--dir", str(args.bench_dir), "--results-dir", tmp]
        if args.dry_run:
            command.append("--quick")
        child = run_child(command, timeout, log, env)
        reports = list(Path(tmp).glob("*.json"))
        if reports:
            entry = json.loads(reports[0].read_text())["benchmarks"][name]
        else:
            entry = {"script": f"{name}.py", "what": "", "ok": False, "tables": []}
            entry["seconds"] = child["seconds"]
            entry["error"] = (
                f"timed out after {child['seconds']:.0f} s"
                if child["timed_out"]
                else f"exit status {child['returncode']}, no report"
            )
        return entry


def run_demo(
    args: argparse.Namespace, timeout: float, log: IO[str], env: dict[str, str]
) -> dict[str, Any]:
    """The demo's ``--quick`` (smaller still in a dry run): its results and table."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        command = [sys.executable, "-m", "optax_warmup.demo", "--quick"]
        command += ["--out", str(out), "--cache-dir", str(Path(tmp) / "cache")]
        command += ["--no-progress", *(DEMO_DRY_RUN if args.dry_run else [])]
        child = run_child(command, timeout, log, env)
        entry: dict[str, Any] = {
            **child,
            "ok": child["returncode"] == 0 and (out / "results.json").exists(),
        }
        if (out / "results.json").exists():
            entry["results"] = json.loads((out / "results.json").read_text())
        if (out / "table.md").exists():
            entry["table"] = (out / "table.md").read_text()
        return entry


def markdown(report: dict[str, Any]) -> str:
    """run_all's summary and tables, the host, then the demo's table."""
    host = report["host"]
    gpus = host["nvidia_smi"] or []
    lines = [run_all.markdown(report).rstrip(), "", "### Host", ""]
    for gpu in gpus:
        lines.append(
            f"- {gpu.get('name')}, driver {gpu.get('driver_version')}, "
            f"{gpu.get('memory.total')}, max SM clock {gpu.get('clocks.max.sm')}"
        )
    known = {k: v for k, v in host["versions"].items() if v is not None}
    lines.append("- " + ", ".join(f"{k} {v}" for k, v in known.items()))
    lines.append(f"- whole run {report['seconds']:.0f} s")
    demo = report.get("demo")
    if demo is not None:
        lines += ["", "### demo --quick", ""]
        if demo["ok"]:
            lines.append(f"{demo['seconds']:.0f} s.")
            lines += ["", demo.get("table", "").rstrip()]
        else:
            reason = "timed out" if demo["timed_out"] else "failed"
            lines.append(f"{reason} after {demo['seconds']:.0f} s (see log.txt)")
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], out: Path, stem: str) -> None:
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=repr) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
        help="where to write (default: $OUT)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="the benchmarks' --quick sizes and a two-epoch demo (runs on CPU)",
    )
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="the whole run's time (s)"
    )
    parser.add_argument(
        "--only", nargs="+", default=None, help="run only these benchmarks (names)"
    )
    parser.add_argument("--no-demo", action="store_true", help="skip the demo")
    parser.add_argument(
        "--bench-dir", type=Path, default=HERE, help="where the benchmark scripts are"
    )
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("--out is required where $OUT is not set")
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    names = [p.stem for p in run_all.discover(args.bench_dir)]
    if args.only:
        unknown = sorted({n.removesuffix(".py") for n in args.only} - set(names))
        if unknown:
            parser.error(f"no benchmark script named {unknown}")
        names = [n for n in names if n in {o.removesuffix(".py") for o in args.only}]
    args.out.mkdir(parents=True, exist_ok=True)
    # This process only asks JAX which device it is on: it must not hold the device
    # memory that the benchmarks and the demo need (they get the environment as
    # given).
    child_env = dict(os.environ)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

    start = time.perf_counter()
    stem = device_tag() + ("-dry-run" if args.dry_run else "")
    report: dict[str, Any] = {
        "command": ["python", "benchmarks/gpu_run.py", *(argv or sys.argv[1:])],
        "quick": args.dry_run,
        "dry_run": args.dry_run,
        "environment": environment(),
        "host": {"nvidia_smi": nvidia_smi(), "versions": versions()},
        "benchmarks": {},
        "demo": None,
        "seconds": 0.0,
    }
    reserve = 0 if args.no_demo else min(DEMO_SECONDS, args.budget_s / 3)
    with open(args.out / "log.txt", "a") as log:
        for name in names:
            left = args.budget_s - (time.perf_counter() - start) - reserve
            print(f"=== {name} ({left:.0f} s left) ===", flush=True)
            report["benchmarks"][name] = run_benchmark(name, args, left, log, child_env)
            report["seconds"] = time.perf_counter() - start
            write(report, args.out, stem)
        if not args.no_demo:
            left = args.budget_s - (time.perf_counter() - start)
            print(f"=== demo --quick ({left:.0f} s left) ===", flush=True)
            report["demo"] = run_demo(args, left, log, child_env)
        report["seconds"] = time.perf_counter() - start
        write(report, args.out, stem)
    print(markdown(report))
    print(f"wrote {args.out / stem}.json and .md")
    demo_ok = report["demo"] is None or report["demo"]["ok"]
    ok = demo_ok and all(e["ok"] for e in report["benchmarks"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
