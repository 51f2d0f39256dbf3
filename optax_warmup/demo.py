"""``python -m optax_warmup.demo``: Goyal et al.'s warmup experiment, on MNIST-1D.

A small batch n with learning rate η against a large batch kn with the linearly
scaled rate kη and no, constant or gradual warmup (Goyal et al. 2017, Table 2a and
Figures 2-3); the same epochs for all, ×0.1 decays at the same epochs; ``ow.goyal_sgd``
with masked weight decay, ``ow.smoothed_cross_entropy``, a zero-γ
``ow.models.SmallResNet1D`` with ghost BatchNorm over groups of n. This module is the
command line; the runs are in ``_warmup_experiment``, the data in ``_mnist1d`` and
the table and figures in ``_demo_report``.

Outputs in ``--out`` (default ``./optax_warmup_demo/``): ``results.json`` (settings,
every run's per-epoch curves, the summary and the published anchors), ``table.md``
(final test error, mean ± std over seeds, per configuration), ``training_error.png``
and ``lr_schedules.png``. ``python -m optax_warmup.demo --help`` lists the flags;
``--quick`` is a smoke run of under a minute.

References:
  Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
  arXiv:1706.02677.
  Greydanus 2020, Scaling Down Deep Learning (MNIST-1D), arXiv:2011.14439.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import optax

from optax_warmup import _mnist1d
from optax_warmup._demo_report import ANCHORS, markdown_table, plot, summarize
from optax_warmup._warmup_experiment import (
    CONFIGS,
    Experiment,
    default_milestones,
    run_all,
)

QUICK = dict(
    samples=4000,
    epochs=4,
    warmup_epochs=1.0,
    milestones="2,3",
    seeds=1,
    large_batch=256,
)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None or False (the help says it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m optax_warmup.demo",
        description="Goyal et al. 2017's warmup comparison (Table 2a) on MNIST-1D: a "
        "small batch n with rate η against a large batch kn with the linearly scaled "
        "rate kη and no, constant or gradual warmup; same epochs, ×0.1 decays at the "
        "same epochs. Writes results.json, table.md and two PNGs to --out.",
        formatter_class=_HelpFormatter,
    )
    a = p.add_argument
    a(
        "--small-batch",
        type=int,
        default=32,
        help="n: the reference batch, and the ghost BatchNorm group in every run",
    )
    a("--large-batch", type=int, default=1024, help="kn: a multiple of n")
    a("--lr", type=float, default=Experiment.lr, help="η: the rate at batch n")
    a("--epochs", type=int, default=30, help="epochs of every run")
    a("--warmup-epochs", type=float, default=5.0, help="warmup length in epochs")
    a(
        "--milestones",
        type=str,
        default=None,
        help="comma-separated epochs of the ×0.1 decays (default: 1/3, 2/3 and 8/9 "
        "of --epochs, Goyal's 30, 60, 80 of 90)",
    )
    a("--seeds", type=int, default=3, help="seeds per configuration (0, 1, ...)")
    a("--weight-decay", type=float, default=1e-4, help="L2 on conv/dense kernels")
    a("--label-smoothing", type=float, default=0.1, help="α of the cross-entropy")
    a("--widths", type=str, default="8,16,32", help="SmallResNet1D stage widths")
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
        "$XDG_CACHE_HOME/optax_warmup "
        "or ~/.cache/optax_warmup)",
    )
    a(
        "--workers",
        type=int,
        default=None,
        help="processes (default: one per CPU core on a CPU host, else 1)",
    )
    a("--out", type=Path, default=Path("optax_warmup_demo"), help="output directory")
    a(
        "--quick",
        action="store_true",
        help="a smoke run in under a minute: "
        + ", ".join(f"{k}={v}" for k, v in QUICK.items()),
    )
    a("--no-progress", action="store_true", help="no progress bar")
    a(
        "--replot",
        type=Path,
        default=None,
        metavar="DIR",
        help="redraw table.md and the figures from DIR/results.json (no training)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = parser()
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    if args.replot is not None:
        return replot(args.replot)
    milestones = (
        _floats(args.milestones) if args.milestones else default_milestones(args.epochs)
    )
    if args.large_batch % args.small_batch:
        p.error(
            f"--large-batch {args.large_batch} is not a multiple of "
            f"--small-batch {args.small_batch}"
        )
    exp = Experiment(
        small_batch=args.small_batch,
        large_batch=args.large_batch,
        lr=args.lr,
        epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        milestones=milestones,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        widths=_ints(args.widths),
    )
    if min(args.epochs, args.seeds, args.small_batch) < 1:
        p.error("--epochs, --seeds and --small-batch must be at least 1")
    seeds = list(range(args.seeds))
    start = time.perf_counter()
    cache_dir = args.cache_dir or _mnist1d.default_cache_dir()
    try:
        data, generated = _mnist1d.load(args.samples, cache_dir=cache_dir)
        n_train, n_test = len(data["y_train"]), len(data["y_test"])
        if n_train < exp.large_batch:
            raise ValueError(
                f"--large-batch {exp.large_batch} exceeds the {n_train} training "
                f"sequences of --samples {args.samples}"
            )
        for config in CONFIGS:  # bad settings fail here, before any training
            exp.optimizer(config, n_train // exp.batch_size(config))
    except ValueError as error:
        p.error(str(error))
    worker_env = _compilation_cache(Path(cache_dir) / "jax")
    cpu_host = jax.default_backend() == "cpu" and jax.device_count() == 1
    workers = args.workers or (_cpu_count() if cpu_host else 1)
    workers = max(1, min(workers, len(seeds) * len(CONFIGS)))
    print(
        f"MNIST-1D: {n_train} train / {n_test} test sequences "
        f"({'generated' if generated else 'cached'}); {len(CONFIGS)} configurations × "
        f"{len(seeds)} seeds × {exp.epochs} epochs on {jax.device_count()} "
        f"{jax.default_backend()} device(s), {workers} process(es)"
    )
    results = run_all(
        exp,
        seeds,
        data,
        workers,
        show_progress=not args.no_progress,
        worker_env=worker_env,
    )
    summary = summarize(results, exp)
    table = markdown_table(summary)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    figures = plot(results, exp, n_train, out)
    (out / "table.md").write_text(table)
    report = {
        "command": [
            "python",
            "-m",
            "optax_warmup.demo",
            *(argv if argv is not None else sys.argv[1:]),
        ],
        "experiment": dataclasses.asdict(exp),
        "seeds": seeds,
        "dataset": {
            "samples": args.samples,
            "train": n_train,
            "test": n_test,
            "generator": "mnist1d.data.make_dataset (default args)",
        },
        "environment": {
            "backend": jax.default_backend(),
            "devices": jax.device_count(),
            "device": jax.devices()[0].device_kind,
            "workers": workers,
            "cpu_count": _cpu_count(),
            "jax": jax.__version__,
            "optax": optax.__version__,
        },
        "wall_seconds": time.perf_counter() - start,
        "anchors": ANCHORS,
        "summary": summary,
        "runs": results,
    }
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    print(table)
    print(
        f"wrote {out / 'results.json'}, {out / 'table.md'}, "
        + ", ".join(str(f) for f in figures)
        + f" in {report['wall_seconds']:.0f} s"
    )
    return report


def replot(directory: Path) -> dict[str, Any]:
    """Redraws ``table.md`` and the figures of a finished run from its JSON."""
    report = json.loads((directory / "results.json").read_text())
    exp = Experiment(**report["experiment"])
    table = markdown_table(summarize(report["runs"], exp))
    (directory / "table.md").write_text(table)
    figures = plot(report["runs"], exp, report["dataset"]["train"], directory)
    print(table)
    print(f"wrote {directory / 'table.md'}, " + ", ".join(map(str, figures)))
    return report


def _compilation_cache(path: Path) -> dict[str, str]:
    """Turns on JAX's persistent compilation cache (unless the user set one).

    Every process of a run compiles the same programs (the model's initializers, one
    train step per configuration); with the cache on disk they compile once per
    machine, not once per process and run. Returns the environment that gives the
    worker processes the same cache.
    """
    configured = jax.config.jax_compilation_cache_dir
    directory = configured or os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(path)
    if not configured:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return {
        "JAX_COMPILATION_CACHE_DIR": directory,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(
            jax.config.jax_persistent_cache_min_compile_time_secs
        ),
    }


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


if __name__ == "__main__":
    main()
