"""``python -m optax_warmup.demo``: the command line of the demo's experiments.

``main`` reads the command line and then does four things in turn: parse (the
flags, into an experiment's settings), plan (check every value, load the data,
find the runs already finished in ``--out``), run (train the others, each written
to ``--out`` the moment it finishes) and write (the table, the figures and
``results.json``). Global side effects (JAX's compilation cache, the workers'
environment, the signal handler) happen here and nowhere else in the demo.

The default experiment, ``warmup``, is Goyal et al.'s Table 1 on MNIST-1D (see
``optax_warmup.demo.warmup``). Outputs in ``--out`` (default
``./optax_warmup_demo/``): ``results.json`` (settings, every run's per-epoch curves,
the summary and the published anchors), ``table.md`` (final test error, mean ± std
over seeds, per configuration, with the shift from the reference, its interval and p),
``training_error.png``, ``lr_schedules.png``, and ``settings.json`` and ``runs/``
(one file per finished run: the same command resumes from them). ``--help`` lists
the flags; ``--quick`` is a smoke run of about a minute.

References:
  Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
  arXiv:1706.02677.
  Greydanus 2020, Scaling Down Deep Learning (MNIST-1D), arXiv:2011.14439.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import optax

from optax_warmup.demo import (
    adaptive_batch,
    batch_size,
    data,
    distributed,
    launcher,
    runner,
    store,
    warmup,
)
from optax_warmup.demo.experiment import Arrays, Experiment, FlagError, Result, Run
from optax_warmup.demo.flags import flag_name

# Every experiment of --experiment, by name: a new one is its module and a line here.
EXPERIMENTS: dict[str, Experiment[Any]] = {
    e.name: e
    for e in (warmup.EXPERIMENT, batch_size.EXPERIMENT, adaptive_batch.EXPERIMENT)
}
DEFAULT_EXPERIMENT = "warmup"
PROG = "python -m optax_warmup.demo"
EXTRAS = ("mnist1d", "matplotlib", "tqdm", "scipy")  # the `demo` extra


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None or False (the help says it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parser(experiment: Experiment[Any]) -> argparse.ArgumentParser:
    """The flags shared by every experiment, then ``experiment``'s own."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description=experiment.description
        + " Writes results.json, table.md and PNG figures to --out; a command "
        "stopped midway resumes where it stopped.",
        formatter_class=_HelpFormatter,
    )
    a = p.add_argument
    a(
        "--experiment",
        choices=sorted(EXPERIMENTS),
        default=DEFAULT_EXPERIMENT,
        help="which experiment to run",
    )
    a("--seeds", type=int, default=3, help="seeds per configuration (0, 1, ...)")
    a(
        "--samples",
        type=int,
        default=30000,
        help="MNIST-1D sequences generated (80%% train); 5000 is the standard "
        "4000/1000 split of the MNIST-1D paper",
    )
    a(
        "--cache-dir",
        type=Path,
        default=None,
        help="the dataset and JAX compilation cache (default $OPTAX_WARMUP_CACHE, "
        "$XDG_CACHE_HOME/optax_warmup or ~/.cache/optax_warmup)",
    )
    a(
        "--workers",
        type=int,
        default=None,
        help="worker processes, each training whole runs side by side (default: "
        "one per CPU core on a CPU host, else 1)",
    )
    a("--out", type=Path, default=Path("optax_warmup_demo"), help="output directory")
    a(
        "--fresh",
        action="store_true",
        help="start over: discard the runs already in --out (by default the same "
        "command resumes them, and other settings are refused)",
    )
    a(
        "--quick",
        action="store_true",
        help="a smoke run of about a minute: "
        + ", ".join(f"{k}={v}" for k, v in experiment.quick.items()),
    )
    a("--no-progress", action="store_true", help="no progress bar")
    a(
        "--replot",
        type=Path,
        default=None,
        metavar="DIR",
        help="redraw table.md and the figures from DIR/results.json (no training)",
    )
    distributed.add_arguments(p)
    experiment.add_arguments(p)
    return p


def parse(
    argv: Sequence[str] | None,
) -> tuple[argparse.ArgumentParser, argparse.Namespace, Experiment[Any]]:
    """The chosen experiment's parser and the parsed flags (``--quick`` applied)."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    chosen = first.parse_known_args(argv)[0].experiment
    experiment = EXPERIMENTS.get(chosen, EXPERIMENTS[DEFAULT_EXPERIMENT])
    p = parser(experiment)  # an unknown --experiment fails in parse_args below
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(**experiment.quick)
        args = p.parse_args(argv)
    return p, args, experiment


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a command will do, checked before any training."""

    experiment: Experiment[Any]
    settings: Any
    seeds: tuple[int, ...]
    runs: tuple[Run, ...]  # all of them, in the order of the report
    finished: dict[str, Result]  # by run key: already in --out
    run_store: store.RunStore | None  # the output directory (None: not process 0)
    data: Arrays
    generated: bool  # the dataset was generated now, not read from the cache
    samples: int
    cache_dir: Path
    workers: int
    show_progress: bool

    @property
    def todo(self) -> list[Run]:
        return [r for r in self.runs if r.key not in self.finished]


def _shown(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _mismatch(error: store.SettingsMismatch, args: argparse.Namespace) -> FlagError:
    flags = vars(args)
    listed = ", ".join(
        (flag_name(name) if name in flags else name)
        + f" {_shown(new)} (the runs there have {_shown(old)})"
        for name, old, new in error.differences
    )
    return FlagError(
        "--out",
        f"{error.out} holds runs made with other settings: {listed}; rerun with "
        "their settings to resume, or choose another --out, or add --fresh to "
        "start over",
    )


def plan(
    args: argparse.Namespace, experiment: Experiment[Any], *, writer: bool = True
) -> Plan:
    """Checks every flag against the data and ``--out``; raises ``FlagError``.

    ``writer=False`` (processes other than 0 of a cluster): ``--out`` is neither
    read nor written and no run counts as finished.
    """
    settings = experiment.settings(args)
    if args.seeds < 1:
        raise FlagError("--seeds", f"must be at least 1, got {args.seeds}")
    if args.workers is not None and args.workers < 1:
        raise FlagError("--workers", f"must be at least 1, got {args.workers}")
    if args.workers not in (None, 1) and jax.process_count() > 1:
        raise FlagError("--workers", "every process of a cluster trains every run")
    try:
        data.check_num_samples(args.samples)
    except ValueError as error:
        raise FlagError("--samples", str(error)) from None
    seeds = tuple(range(args.seeds))
    stored = {
        "experiment": experiment.name,
        **dataclasses.asdict(settings),
        "seeds": args.seeds,
        "samples": args.samples,
        "dataset_seed": data.SEED,
    }
    try:  # only reads (and probes that --out is writable)
        run_store = (
            store.RunStore(args.out, stored, fresh=args.fresh) if writer else None
        )
    except OSError as error:
        raise FlagError(
            "--out", f"cannot write to {args.out}: {error.strerror or error}"
        ) from None
    except ValueError as error:
        raise FlagError("--out", f"{error}; add --fresh to start over") from None
    cache_dir = args.cache_dir or data.default_cache_dir()
    try:
        arrays, generated = data.load(args.samples, cache_dir=cache_dir)
    except OSError as error:
        raise FlagError(
            "--cache-dir", f"cannot use {cache_dir}: {error.strerror or error}"
        ) from None
    experiment.check(settings, arrays, jax.device_count())
    try:  # compared last: a bad value is named as itself, not as a mismatch
        if run_store is not None:
            run_store.check()
    except store.SettingsMismatch as error:
        raise _mismatch(error, args) from None
    runs = tuple(experiment.runs(settings, seeds))
    keys = {r.key for r in runs}
    stored_runs = run_store.finished() if run_store is not None else {}
    finished = {k: v for k, v in stored_runs.items() if k in keys}
    return Plan(
        experiment=experiment,
        settings=settings,
        seeds=seeds,
        runs=runs,
        finished=finished,
        run_store=run_store,
        data=arrays,
        generated=generated,
        samples=args.samples,
        cache_dir=Path(cache_dir),
        workers=1
        if jax.process_count() > 1
        else (args.workers or runner.default_workers()),
        show_progress=writer and not args.no_progress,
    )


def run(plan: Plan, worker_env: dict[str, str]) -> list[Result]:
    """Trains the runs not yet in ``--out``, writing each as it finishes."""
    n_train, n_test = len(plan.data["y_train"]), len(plan.data["y_test"])
    configs = len({r.config for r in plan.runs})
    print(
        f"MNIST-1D: {n_train} train / {n_test} test sequences "
        f"({'generated' if plan.generated else 'cached'}); {configs} configurations "
        f"× {len(plan.seeds)} seeds × {plan.experiment.epochs(plan.settings)} epochs "
        f"on {jax.device_count()} {jax.default_backend()} device(s), "
        + (
            f"{jax.process_count()} processes"
            if jax.process_count() > 1
            else f"{min(plan.workers, len(plan.todo)) or 1} process(es)"
        )
    )
    todo = plan.todo
    if plan.finished and plan.run_store is not None:
        print(
            f"resuming {plan.run_store.out}: skipping the {len(plan.finished)} of "
            f"{len(plan.runs)} runs already finished there; {len(todo)} to train"
        )
    if plan.run_store is not None:
        plan.run_store.start()
    saved = [0]

    def save(run: Run, result: Result) -> None:
        if plan.run_store is not None:
            plan.run_store.save(run.key, result)
        saved[0] += 1

    try:
        new = runner.run_all(
            plan.experiment,
            plan.settings,
            todo,
            plan.data,
            workers=plan.workers,
            on_result=save,
            show_progress=plan.show_progress,
            worker_env=worker_env,
        )
    except (KeyboardInterrupt, SystemExit):
        done = len(plan.finished) + saved[0]
        if plan.run_store is not None:
            print(
                f"\nstopped: {done} of {len(plan.runs)} runs are saved in "
                f"{plan.run_store.runs_dir}; the same command resumes from them",
                file=sys.stderr,
            )
        raise
    trained = dict(zip((r.key for r in todo), new, strict=True))
    return [
        plan.finished[r.key] if r.key in plan.finished else trained[r.key]
        for r in plan.runs
    ]


def write(
    plan: Plan, results: list[Result], command: list[str], seconds: float
) -> dict[str, Any]:
    """Writes the table, the figures and ``results.json``; returns the report."""
    assert plan.run_store is not None, "only process 0 writes"
    experiment, out = plan.experiment, plan.run_store.out
    summary = experiment.summarize(results, plan.settings)
    table = experiment.table(summary)
    n_train = len(plan.data["y_train"])
    figures = experiment.figures(results, plan.settings, out)
    store.write_text(out / "table.md", table)
    report = {
        "command": command,
        "experiment_name": experiment.name,
        "experiment": dataclasses.asdict(plan.settings),
        "seeds": list(plan.seeds),
        "dataset": {
            "samples": plan.samples,
            "train": n_train,
            "test": len(plan.data["y_test"]),
            "generator": "mnist1d.data.make_dataset (default args)",
        },
        "environment": {
            "backend": jax.default_backend(),
            "devices": jax.device_count(),
            "device": jax.devices()[0].device_kind,
            "workers": plan.workers,
            "processes": jax.process_count(),
            "cpu_count": runner.cpu_count(),
            "jax": jax.__version__,
            "optax": optax.__version__,
        },
        "wall_seconds": seconds,
        "resumed_runs": len(plan.finished),
        "anchors": experiment.anchors,
        "summary": summary,
        "runs": results,
    }
    store.write_json(out / store.REPORT_FILE, report)
    print(table + "\n".join(experiment.notes(summary)))
    print(
        f"wrote {out / store.REPORT_FILE}, {out / 'table.md'}, "
        + ", ".join(str(f) for f in figures)
        + f" in {seconds:.0f} s"
        + (f" ({len(plan.finished)} runs resumed from disk)" if plan.finished else "")
    )
    return report


def replot(directory: Path) -> dict[str, Any]:
    """Redraws ``table.md`` and the figures of a finished command from its JSON."""
    path = directory / store.REPORT_FILE
    try:
        report = store.read_json(path)
        experiment = EXPERIMENTS[report.get("experiment_name", DEFAULT_EXPERIMENT)]
        settings = experiment.load_settings(report["experiment"])
        runs = report["runs"]
    except OSError as error:
        raise FlagError("--replot", f"cannot read {path}: {error.strerror}") from None
    except (ValueError, KeyError, TypeError) as error:
        raise FlagError("--replot", f"{path} is not a demo report: {error}") from None
    summary = experiment.summarize(runs, settings)
    table = experiment.table(summary)
    store.write_text(directory / "table.md", table)
    figures = experiment.figures(runs, settings, directory)
    print(table + "\n".join(experiment.notes(summary)))
    print(f"wrote {directory / 'table.md'}, " + ", ".join(map(str, figures)))
    return report


def _compilation_cache(path: Path) -> dict[str, str]:
    """Turns on JAX's persistent compilation cache (unless the user set one).

    Every process of a run compiles the same programs (the model's initializers, one
    train step per configuration); with the cache on disk they compile once per
    machine, not once per process and run. Returns the environment that gives the
    worker processes the same cache.
    """
    config: Any = jax.config  # its options are dynamic attributes
    configured = config.jax_compilation_cache_dir
    directory = configured or os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(path)
    if not configured:
        config.update("jax_compilation_cache_dir", directory)
        config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return {
        "JAX_COMPILATION_CACHE_DIR": directory,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(
            config.jax_persistent_cache_min_compile_time_secs
        ),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the command line ``argv`` (default ``sys.argv[1:]``); returns the report.

    A bad command line exits with status 2 and a one-line message naming the flag,
    before any training.
    """
    start = time.perf_counter()
    p, args, experiment = parse(argv)
    missing = [m for m in EXTRAS if importlib.util.find_spec(m) is None]
    if missing:
        p.error(f"needs {', '.join(missing)}: pip install 'optax_warmup[demo]'")
    command = list(argv if argv is not None else sys.argv[1:])
    try:
        if args.replot is not None:
            return replot(args.replot)
        cluster = distributed.cluster(args)
        if cluster.launch:
            return _launch(args, experiment, command, cluster.launch)
        if cluster.join:
            launcher.exit_with_launcher()
            distributed.connect(cluster)
    except FlagError as error:
        p.error(str(error))
    writer = distributed.quiet_unless_first()
    the_plan: Plan | None = None
    message: str | None = None
    try:
        different = distributed.differences(_shared_flags(args))
        if different:
            raise FlagError(
                "--process-id",
                "the processes were started with different settings: "
                + "; ".join(different),
            )
        the_plan = plan(args, experiment, writer=writer)
    except FlagError as error:
        message = str(error)
    message = distributed.first_error(message)  # any process's error stops them all
    if message is not None or the_plan is None:
        p.error(str(message))
    if not writer:  # train what process 0 has not: the same runs everywhere
        done = distributed.allgather_json(None)[0]
        the_plan = dataclasses.replace(the_plan, finished={k: {} for k in done})
    elif jax.process_count() > 1:
        distributed.allgather_json(sorted(the_plan.finished))
    worker_env: dict[str, str] = {}
    if the_plan.todo:  # nothing to compile when every run is on disk
        worker_env = _compilation_cache(the_plan.cache_dir / "jax")
    results = run(the_plan, worker_env)
    if not writer:
        return {}
    command = ["python", "-m", "optax_warmup.demo", *command]
    return write(the_plan, results, command, time.perf_counter() - start)


# Flags that may differ between the processes of a cluster (only process 0 writes).
_LOCAL_FLAGS = {"process_id", "out", "cache_dir", "no_progress", "coordinator_timeout"}


def _shared_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in _LOCAL_FLAGS}


def _launch(
    args: argparse.Namespace,
    experiment: Experiment[Any],
    argv: list[str],
    processes: int,
) -> dict[str, Any]:
    """``--processes N``: checks the flags once, makes the dataset once, then runs
    the command as N local jax.distributed workers; their report, or ``SystemExit``
    with the status of the worker that failed."""
    experiment.settings(args)  # a bad value: one error here, not one per worker
    try:
        data.check_num_samples(args.samples)
        cache_dir = args.cache_dir or data.default_cache_dir()
        data.load(args.samples, cache_dir=cache_dir)  # the workers read the cache
    except ValueError as error:
        raise FlagError("--samples", str(error)) from None
    except OSError as error:
        raise FlagError(
            "--cache-dir", f"cannot use {cache_dir}: {error.strerror or error}"
        ) from None
    env = _compilation_cache(Path(cache_dir) / "jax")
    status = launcher.launch(argv, processes, env=env)
    if status:
        raise SystemExit(status)
    return store.read_json(args.out / store.REPORT_FILE)


def _stop(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _fail(status: int) -> None:
    """Exits with ``status``; a process of a cluster exits at once: at exit,
    jax.distributed waits for every other process to shut down, and they wait in a
    collective for this one."""
    if status and distributed.connected():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)  # unwind: workers are ended, bar closed
    try:
        main()
    except KeyboardInterrupt:
        _fail(130)
    except SystemExit as stop:
        code = stop.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
        _fail(code if isinstance(code, int) else 0 if code is None else 1)
    except BaseException:
        traceback.print_exc()
        _fail(1)
