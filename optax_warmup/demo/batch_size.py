"""The batch-size experiment: how large can the batch be? (``--experiment batch-size``)

Goyal et al. 2017's Figure 1, scaled down: the demo's small 1-D ResNet
(``model.small_resnet``) trained on MNIST-1D at batches kn = n·2^j, from n up to
4096, each for the same number of epochs with the linear scaling rule (peak rate
kη), a gradual warmup and the same ×0.1 decays, BatchNorm statistics over groups of
n (ghost BatchNorm) in every run. Along each run with kn > n the gradient noise
scale B_simple of McCandlish et al. 2018 is measured in the train step
(``ow.value_and_grad_by_group`` over the ghost BatchNorm groups,
``ow.track_noise_scale`` in the optimizer) and read once per epoch. At the large
batches the same schedule also runs with LARS (You et al. 2017; ``ow.lars``, BatchNorm
parameters and biases masked from decay and trust ratio), whose peak rate is one
number, tuned at one batch and kept for the others (You et al. raise it with the batch).

The report: ``summarize`` turns the runs into one row per configuration (final
test error mean ± std over seeds, the gap to the reference with its standard error
and Welch's p, the training-average B_simple, the steps to the target error) and
the analysis:

- the breakdown of each optimizer: the smallest kn > n whose mean final error
  exceeds the reference's by more than two standard errors of the gap,
  ``Δ > 2·√(s²/m + s_ref²/m_ref)`` (with one seed a side the standard error is 0
  and any excess counts); the error is flat up to the largest batch below it
  (Goyal et al.'s stable region, which on ImageNet reaches about 8k, §2.1);
- B_simple over training: B_simple of the SGD runs at the smallest batch above n
  (the trajectory closest to the reference's), the ratio of the averages over
  epochs, ``Σ_e tr Σ_e / Σ_e |G|²_e`` (each epoch's value is the tracker's moving
  average, which spans about that epoch), then the mean over seeds;
- the steps to the target error: where a run's test error, evaluated after each
  epoch and interpolated linearly between epochs, first reaches the target; a
  configuration's is the median over seeds (None when most seeds never get there);
- McCandlish et al.'s critical batch at the target (``mccandlish``): their
  trade-off ``(S/S_min − 1)(E/E_min − 1) = 1`` fitted to the steps S and examples
  E = kn·S of every SGD run that reaches it, ``B_crit = E_min / S_min``, against
  B_simple of the same runs (kn > n) averaged over the same stretch of training
  (the epochs up to the target), their ratio per seed.

``plot`` draws ``error_vs_batch.png`` (their Figure 1 with SGD and LARS, the
breakdown and B_simple), ``noise_scale.png`` (B_simple per epoch) and
``steps_to_target.png`` (Shallue et al.'s log-log view with the perfect-scaling
line of slope −1, McCandlish et al.'s fitted curve and B_crit).

This module is the whole experiment, ``EXPERIMENT``: its configurations and
settings, one run, its flags, the analysis and the report.

References:
  Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
  arXiv:1706.02677.
  McCandlish et al. 2018, An Empirical Model of Large-Batch Training,
  arXiv:1812.06162.
  You, Gitman, Ginsburg 2017, Large Batch Training of Convolutional Networks,
  arXiv:1708.03888.
  Shallue et al. 2019, Measuring the Effects of Data Parallelism on Neural Network
  Training, arXiv:1811.03600.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

import optax_warmup as ow
from optax_warmup.demo import flags, report, stats
from optax_warmup.demo.experiment import (
    Arrays,
    Experiment,
    FlagError,
    OnEpoch,
    Result,
    Summary,
)
from optax_warmup.demo.model import small_resnet
from optax_warmup.demo.training import run_result, steps_per_epoch, train_classifier

OPTIMIZERS = ("sgd", "lars")
# 30,720 sequences: 24,576 = 6 × 4096 for training (no example dropped at any
# batch of the list) and 6,144 for testing.
DEFAULT_SAMPLES = 30720
DEFAULT_SEEDS = 3

ANCHORS = {
    "goyal_2017_figure_1": {
        "what": "ResNet-50 on ImageNet, 90 epochs, linear scaling + gradual warmup",
        "source": "Figure 1; the points from Figure 3's legends, 256 from §5.1",
        "top-1 error % (mean ± std of 5 runs)": {
            "128": "23.49 ± 0.12",
            "256": "23.60 ± 0.12",
            "512": "23.48 ± 0.09",
            "1k": "23.53 ± 0.08",
            "2k": "23.49 ± 0.11",
            "4k": "23.56 ± 0.12",
            "8k": "23.74 ± 0.09",
            "16k": "24.79 ± 0.27",
            "32k": "27.55 ± 0.28",
            "64k": "33.96 ± 0.80",
        },
    },
    "mccandlish_2018": {
        "what": "the critical batch size against B_simple = tr(Σ)/|G|²",
        "claim": "B_simple predicts the critical batch within an order of magnitude",
    },
    "you_2017_lars": {
        "what": "AlexNet, AlexNet-BN and ResNet-50 on ImageNet with LARS",
        "claim": "abstract: 'Using LARS, we scaled Alexnet up to a batch size of 8K, "
        "and Resnet-50 to a batch size of 32K without loss in accuracy.'",
    },
}


def config_name(optimizer: str, batch: int) -> str:
    """A row's name, e.g. ``sgd-1024``."""
    return f"{optimizer}-{batch}"


def parse_config(config: str) -> tuple[str, int]:
    """``("sgd", 1024)`` from ``"sgd-1024"``."""
    optimizer, batch = config.rsplit("-", 1)
    return optimizer, int(batch)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The settings shared by every run (see ``--help``)."""

    small_batch: int = 32
    batches: tuple[int, ...] = tuple(32 * 2**j for j in range(8))  # 32 … 4096
    lr: float = 0.1
    epochs: int = 12
    warmup_epochs: float = 2.0
    milestones: tuple[float, ...] = (4.0, 8.0, 11.0)
    weight_decay: float = 1e-4
    momentum: float = 0.9
    label_smoothing: float = 0.1
    widths: tuple[int, ...] = (8, 16, 32)
    optimizers: tuple[str, ...] = OPTIMIZERS
    lars_batches: tuple[int, ...] = (1024, 2048, 4096)
    lars_lr: float = 20.0
    trust_coefficient: float = 0.001
    target_error: float = 0.05

    def __post_init__(self):  # lists (from JSON, say) become tuples: hashable
        for name, kind in (
            ("batches", int),
            ("milestones", float),
            ("widths", int),
            ("lars_batches", int),
            ("optimizers", str),
        ):
            object.__setattr__(self, name, tuple(map(kind, getattr(self, name))))

    @property
    def reference(self) -> str:
        """The reference row: SGD at batch n."""
        return config_name("sgd", self.small_batch)

    def configs(self) -> list[str]:
        """Every row: SGD at each batch, then LARS at each of its batches."""
        names = []
        if "sgd" in self.optimizers:
            names += [config_name("sgd", b) for b in self.batches]
        if "lars" in self.optimizers:
            names += [config_name("lars", b) for b in self.lars_batches]
        return names

    def peak_lr(self, config: str) -> float:
        """SGD: kη (``ow.linear_scaling_rule``); LARS: ``lars_lr`` at every batch."""
        optimizer, batch = parse_config(config)
        if optimizer == "lars":
            return self.lars_lr
        return float(
            np.asarray(ow.linear_scaling_rule(self.lr, batch, self.small_batch))
        )

    def schedule(self, config: str, steps_per_epoch: int) -> optax.Schedule:
        """``ow.goyal_schedule``: from peak/k up to the peak over the warmup, then
        ×0.1 at each milestone (k = kn/n; for SGD the start is η)."""
        _, batch = parse_config(config)
        return ow.goyal_schedule(
            batch_size=batch,
            steps_per_epoch=steps_per_epoch,
            base_lr=self.peak_lr(config) * self.small_batch / batch,
            base_batch_size=self.small_batch,
            warmup_epochs=self.warmup_epochs,
            milestones=self.milestones,
            warmup="gradual",
        )

    def tracks_noise_scale(self, config: str) -> bool:
        """B_simple needs at least two ghost BatchNorm groups: kn > n."""
        return parse_config(config)[1] > self.small_batch

    def recipe(self, config: str, steps_per_epoch: int) -> optax.GradientTransformation:
        """``ow.sgd`` or ``ow.lars`` on ``schedule(config, steps_per_epoch)``."""
        optimizer, _ = parse_config(config)
        schedule = self.schedule(config, steps_per_epoch)
        if optimizer == "lars":
            return ow.lars(
                schedule,
                momentum=self.momentum,
                weight_decay=self.weight_decay,
                trust_coefficient=self.trust_coefficient,
            )
        return ow.sgd(schedule, momentum=self.momentum, weight_decay=self.weight_decay)

    def optimizer(
        self, config: str, steps_per_epoch: int
    ) -> optax.GradientTransformation:
        """The recipe, after ``ow.track_noise_scale`` when kn > n.

        The tracker's moving averages decay by ``1 − 1/steps_per_epoch`` per step:
        the value read after an epoch averages about that epoch.
        """
        tx = self.recipe(config, steps_per_epoch)
        if not self.tracks_noise_scale(config):
            return tx
        _, batch = parse_config(config)
        decay = 1.0 - 1.0 / steps_per_epoch
        tracker = ow.track_noise_scale(self.small_batch, batch, decay=decay)
        return optax.chain(tracker, tx)

    def model(self, seed: int) -> nnx.Module:
        """The zero-γ ``SmallResNet1D`` with ghost BatchNorm over groups of n."""
        return small_resnet(self.widths, self.small_batch, seed)


def _tracker(opt_state: Any) -> Any:
    return opt_state[0]  # optax.chain(track_noise_scale, recipe)


READOUTS_WITH_NOISE_SCALE = {
    "lr": ow.current_lr,
    "noise_scale": ow.current_noise_scale,
    "g2": lambda state: _tracker(state).g2,
    "trace_sigma": lambda state: _tracker(state).trace_sigma,
}


def train_run(
    settings: Settings,
    config: str,
    seed: int,
    data: Arrays,
    *,
    mesh: Mesh | None = None,
    on_epoch: OnEpoch | None = None,
) -> Result:
    """Trains one (configuration, seed) and returns its per-epoch curves.

    Returns ``training.run_result``: what the run was (``config``,
    ``optimizer``, ``seed``, ``batch_size``), the final errors
    (``final_test_error``: Goyal's median of the last 5 epochs) and the curves of
    ``training.train_classifier`` (with, for kn > n, the tracker's
    ``noise_scale``, ``g2`` and ``trace_sigma`` after each epoch).
    """
    optimizer, batch = parse_config(config)
    steps = steps_per_epoch(len(data["y_train"]), batch)
    tracked = settings.tracks_noise_scale(config)
    curves = train_classifier(
        settings.model(seed),
        settings.optimizer(config, steps),
        data,
        batch_size=batch,
        epochs=settings.epochs,
        seed=seed,
        label_smoothing=settings.label_smoothing,
        mesh=mesh,
        on_epoch=on_epoch,
        readouts=READOUTS_WITH_NOISE_SCALE if tracked else {"lr": ow.current_lr},
        step_key=(settings, config, steps),
        noise_scale_group=settings.small_batch if tracked else None,
    )
    return run_result(
        curves, config=config, optimizer=optimizer, seed=seed, batch_size=batch
    )


# --- the command line -------------------------------------------------------------


def _optimizers(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(OPTIMIZERS)}, got {text!r}"
        )
    return names


# The library's arguments that this experiment's flags set (besides the recipe's).
_FLAG_OF = {"trust_coefficient": "--trust-coefficient", "momentum": "--momentum"}
_LARS_FLAG_OF = {**_FLAG_OF, "base_lr": "--lars-lr", "learning_rate": "--lars-lr"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe's flags, then the batches, the optimizers and the target."""
    d = Settings()
    parser.set_defaults(samples=DEFAULT_SAMPLES, seeds=DEFAULT_SEEDS)
    flags.add_recipe_arguments(parser, d)
    a = parser.add_argument_group("the batch-size experiment").add_argument
    a(
        "--batches",
        type=flags.ints,
        default=flags.shown(d.batches),
        help="comma-separated batches kn of the SGD runs, multiples of n; n (the "
        "reference) among them",
    )
    a(
        "--optimizers",
        type=_optimizers,
        default=",".join(d.optimizers),
        help="which optimizers run: sgd (every batch of --batches), lars (the "
        "batches of --lars-batches)",
    )
    a(
        "--lars-batches",
        type=flags.ints,
        default=flags.shown(d.lars_batches),
        help="comma-separated batches of the LARS runs, multiples of n",
    )
    a(
        "--lars-lr",
        type=float,
        default=d.lars_lr,
        help="LARS's peak rate, the same at every batch (tuned at kn=1024)",
    )
    a(
        "--trust-coefficient",
        type=float,
        default=d.trust_coefficient,
        help="LARS's trust coefficient c",
    )
    a(
        "--target-error",
        type=float,
        default=100 * d.target_error,
        help="the test error (%%) of the steps-to-target figure",
    )


def from_flags(args: argparse.Namespace) -> Settings:
    """The settings of the parsed flags; ``FlagError`` for a value that cannot
    work."""
    milestones = flags.check_recipe_arguments(args)
    n = args.small_batch
    for dest in ("batches", "lars_batches"):
        values, flag = getattr(args, dest), flags.flag_name(dest)
        bad = [b for b in values if b < n or b % n]
        if bad:
            raise FlagError(
                flag, f"{flags.shown(bad)}: not a multiple of --small-batch {n}"
            )
        if len(set(values)) != len(values) or list(values) != sorted(values):
            raise FlagError(flag, f"{flags.shown(values)} must be strictly increasing")
    if "sgd" in args.optimizers and n not in args.batches:
        raise FlagError(
            "--batches",
            f"{flags.shown(args.batches)} must include the reference batch "
            f"--small-batch {n}",
        )
    if "sgd" not in args.optimizers:
        raise FlagError(
            "--optimizers",
            f"{','.join(args.optimizers)} must include sgd (the reference)",
        )
    if not 0 < args.target_error < 100:
        raise FlagError(
            "--target-error",
            f"must be in (0, 100) percent, got {args.target_error}",
        )
    return Settings(
        **{
            **flags.settings_fields(args, Settings),
            "milestones": milestones,
            "lars_batches": args.lars_batches if "lars" in args.optimizers else (),
            "target_error": args.target_error / 100,
        }
    )


def check(settings: Settings, data: Arrays, devices: int) -> None:
    """``FlagError`` unless every configuration can train on ``data`` over
    ``devices``, the library's own checks included."""
    n_train = len(data["y_train"])
    flags.check_batches(
        {"--batches": settings.batches, "--lars-batches": settings.lars_batches},
        settings.small_batch,
        n_train,
        devices,
    )
    for config in settings.configs():
        optimizer, batch = parse_config(config)
        with flags.library_checks(_LARS_FLAG_OF if optimizer == "lars" else _FLAG_OF):
            settings.optimizer(config, n_train // batch)


# --- the analysis and the report --------------------------------------------------

OPTIMIZER_LABELS = {"sgd": "SGD", "lars": "LARS"}


def training_noise_scale(run: Result, epochs: int | None = None) -> float | None:
    """A run's B_simple averaged over training, ``Σ tr Σ / Σ |G|²`` over epochs (the
    first ``epochs`` of them: the stretch up to a target)."""
    g2, trace = run.get("g2"), run.get("trace_sigma")
    if not g2 or not trace:
        return None
    g2_sum = float(np.sum(np.asarray(g2[:epochs], np.float64)))
    trace_sum = float(np.sum(np.asarray(trace[:epochs], np.float64)))
    return stats.noise_scale_of_sums(trace_sum, g2_sum)


def steps_to_target(run: Result, target: float) -> float | None:
    """Steps until the test error first reaches ``target``, interpolated linearly
    between the evaluations after each epoch (``stats.count_to_target``; the
    first epoch's steps if it is already there), or None."""
    errors = run["test_error"]
    steps = [run["steps_per_epoch"] * e for e in range(1, len(errors) + 1)]
    return stats.count_to_target(steps, errors, target)


def mccandlish(results: Sequence[Result], settings: Settings) -> dict[str, Any]:
    """McCandlish et al.'s critical batch at the target error: their trade-off
    fitted to the (steps, examples) of the SGD runs that reach it, against
    B_simple of the runs with kn > n averaged over the same stretch (the epochs up
    to the one where each reaches the target), per seed
    (``stats.critical_batch_vs_noise_scale``)."""
    points: dict[int, list[tuple[float, float]]] = {}
    scales: dict[int, list[float | None]] = {}
    for run in results:
        if run["optimizer"] != "sgd" or run["diverged"]:
            continue
        steps = steps_to_target(run, settings.target_error)
        if steps is None:
            continue
        points.setdefault(run["seed"], []).append((steps, steps * run["batch_size"]))
        if settings.tracks_noise_scale(run["config"]):
            epochs = math.ceil(steps / run["steps_per_epoch"] - 1e-9)
            scales.setdefault(run["seed"], []).append(training_noise_scale(run, epochs))
    return {
        "target_error": settings.target_error,
        **stats.critical_batch_vs_noise_scale(points, scales),
    }


def _median_steps(steps: Sequence[float | None]) -> float | None:
    values = np.asarray([np.inf if s is None else s for s in steps], np.float64)
    median = float(np.median(values))
    return median if np.isfinite(median) else None


def summarize(results: Sequence[Result], settings: Settings) -> Summary:
    """``{"rows": per configuration, "analysis": breakdown, prediction, target}``."""
    rows: dict[str, dict[str, Any]] = {}
    for config in settings.configs():
        runs = [r for r in results if r["config"] == config]
        if not runs:
            continue
        optimizer, batch = parse_config(config)
        errors = [r["final_test_error"] for r in runs]
        mean, std = stats.mean_std(errors)
        scales = [training_noise_scale(r) for r in runs]
        measured = [s for s in scales if s is not None]
        steps = [steps_to_target(r, settings.target_error) for r in runs]
        rows[config] = {
            "optimizer": optimizer,
            "batch_size": batch,
            "is_reference": config == settings.reference,
            "peak_lr": settings.peak_lr(config),
            "steps_per_epoch": runs[0]["steps_per_epoch"],
            "test_error_mean": mean,
            "test_error_std": std,
            "test_errors": errors,
            "diverged_runs": sum(r["diverged"] for r in runs),
            "noise_scale": float(np.mean(measured)) if measured else None,
            "noise_scales": scales,
            "steps_to_target": _median_steps(steps),
            "steps_to_target_per_seed": steps,
        }
    reference = rows.get(settings.reference)
    if reference is not None:
        for config, row in rows.items():
            row.update(
                stats.versus_reference(row["test_errors"], reference["test_errors"])
            )
            if config == settings.reference:
                row["p_value"] = None
    analysis = analyze(rows, settings)
    analysis["mccandlish"] = mccandlish(results, settings)
    fit = analysis["mccandlish"]
    if fit.get("b_crit") and fit["b_simple"]:
        analysis["b_simple_over_b_crit"] = fit["b_simple"] / fit["b_crit"]
    else:
        analysis["b_simple_over_b_crit"] = None
    return {"rows": rows, "analysis": analysis}


def analyze(rows: dict[str, dict[str, Any]], settings: Settings) -> dict[str, Any]:
    """The breakdown and the flat region per optimizer, and B_simple over training
    at the smallest batch above n."""
    analysis: dict[str, Any] = {
        "breakdown_rule": "the smallest kn > n whose mean final test error exceeds "
        "the reference's by more than 2 standard errors of the gap",
        "target_error": settings.target_error,
        "breakdown": {},
        "flat_up_to": {},
    }
    if settings.reference not in rows:
        return analysis
    for optimizer in settings.optimizers:
        mine = sorted(
            (r for r in rows.values() if r["optimizer"] == optimizer),
            key=lambda r: r["batch_size"],
        )
        broken = [
            r["batch_size"]
            for r in mine
            if r["batch_size"] > settings.small_batch
            and r["gap_vs_reference"] > 2 * r["gap_standard_error"]
        ]
        first = broken[0] if broken else None
        below = [
            r["batch_size"] for r in mine if first is None or r["batch_size"] < first
        ]
        analysis["breakdown"][optimizer] = first
        analysis["flat_up_to"][optimizer] = max(below) if below else None
    tracked = sorted(
        (r for r in rows.values() if r["optimizer"] == "sgd" and r["noise_scale"]),
        key=lambda r: r["batch_size"],
    )
    predicted = tracked[0]["noise_scale"] if tracked else None
    analysis["predicted_critical_batch"] = predicted
    analysis["predicted_from_batch"] = tracked[0]["batch_size"] if tracked else None
    return analysis


def markdown_table(summary: Summary) -> str:
    """One row per (optimizer, batch): errors in percent, B_simple, steps."""
    header = [
        "batch kn",
        "optimizer",
        "peak rate",
        "test error (%)",
        "Δ vs reference (pp)",
        "p vs reference",
        "B_simple",
        "steps to target",
    ]
    rows = []
    for row in summary["rows"].values():
        gap = (
            "–"
            if row["is_reference"]
            else report.gap_cell(row["gap_vs_reference"], row["gap_standard_error"])
        )
        diverged = f" ({row['diverged_runs']} diverged)" if row["diverged_runs"] else ""
        scale = row["noise_scale"]
        steps = row["steps_to_target"]
        rows.append(
            [
                str(row["batch_size"]),
                OPTIMIZER_LABELS[row["optimizer"]] + diverged,
                f"{row['peak_lr']:.4g}",
                report.percent_pm(row["test_error_mean"], row["test_error_std"]),
                gap,
                report.p_cell(row.get("p_value")),
                "–" if scale is None else f"{scale:.0f}",
                "not reached" if steps is None else f"{steps:.0f}",
            ]
        )
    return report.markdown_table(header, rows)


def notes(summary: Summary) -> list[str]:
    """What the columns mean, then the breakdown and the prediction in words."""
    a = summary["analysis"]
    p_values = [
        r.get("p_value") for r in summary["rows"].values() if not r["is_reference"]
    ]
    lines = [
        report.p_value_note(p_values),
        "B_simple: tr(Σ)/|G|² over the ghost BatchNorm groups, averaged over "
        "training (ratio of the per-epoch averages), mean over seeds",
        f"steps to target: steps until the test error first reaches "
        f"{100 * a['target_error']:g}% (evaluated after each epoch, linearly "
        "interpolated between epochs), median over seeds",
        "breakdown: " + a["breakdown_rule"],
    ]
    for optimizer, batch in a["breakdown"].items():
        name = OPTIMIZER_LABELS[optimizer]
        critical = a["flat_up_to"].get(optimizer)
        if batch is None:
            lines.append(f"{name}: no breakdown up to the largest batch of the list")
        elif critical is None:
            lines.append(
                f"{name}: worse than the reference from its smallest batch, kn={batch}"
            )
        else:
            lines.append(f"{name}: breaks down at kn={batch}; flat up to kn={critical}")
    predicted = a.get("predicted_critical_batch")
    if predicted is not None:
        lines.append(
            f"B_simple over training ≈ {predicted:.0f} (SGD runs at "
            f"kn={a['predicted_from_batch']})"
        )
    fit = a.get("mccandlish") or {}
    if fit.get("b_crit") is not None:
        line = (
            f"McCandlish et al.'s critical batch at {100 * fit['target_error']:g}%: "
            f"B_crit = E_min/S_min ≈ {fit['e_min']:.0f}/{fit['s_min']:.0f} ≈ "
            f"{fit['b_crit']:.0f} (SGD at kn="
            + ",".join(map(str, fit["batches_reached"]))
            + ")"
        )
        if fit["b_simple"] is not None and fit["ratio_mean"] is not None:
            line += (
                f"; B_simple over the same stretch ≈ {fit['b_simple']:.0f}, "
                f"B_simple/B_crit = {fit['ratio_mean']:.2f} ± {fit['ratio_std']:.2f} "
                "over seeds"
            )
        lines.append(line)
    else:
        lines.append(
            "McCandlish et al.'s critical batch: not fitted (fewer than two SGD "
            "batches reach the target)"
        )
    return lines


COLORS = {"sgd": "C0", "lars": "C1"}
MARKERS = {"sgd": "o", "lars": "s"}


def _by_batch(rows: Summary, optimizer: str) -> list[dict[str, Any]]:
    mine = (r for r in rows.values() if r["optimizer"] == optimizer)
    return sorted(mine, key=lambda r: r["batch_size"])


def plot(results: Sequence[Result], settings: Settings, out: Path) -> list[Path]:
    """Writes error_vs_batch.png, noise_scale.png and steps_to_target.png."""
    summary = summarize(results, settings)
    rows, a = summary["rows"], summary["analysis"]
    paths = [
        out / "error_vs_batch.png",
        out / "noise_scale.png",
        out / "steps_to_target.png",
    ]
    predicted = a.get("predicted_critical_batch")

    # 1. Goyal's Figure 1: final test error against the batch.
    with report.figure(paths[0], figsize=(7, 4.5)) as (_, ax):
        for optimizer in settings.optimizers:
            mine = _by_batch(rows, optimizer)
            if not mine:
                continue
            ax.errorbar(
                [r["batch_size"] for r in mine],
                [100 * r["test_error_mean"] for r in mine],
                yerr=[100 * r["test_error_std"] for r in mine],
                color=COLORS[optimizer],
                marker=MARKERS[optimizer],
                capsize=3,
                label=f"{OPTIMIZER_LABELS[optimizer]} (mean ± std over seeds)",
            )
            broken = a["breakdown"].get(optimizer)
            if broken is not None:
                ax.axvline(
                    broken,
                    color=COLORS[optimizer],
                    linestyle=":",
                    label=f"{OPTIMIZER_LABELS[optimizer]} breakdown: kn={broken}",
                )
        if settings.reference in rows:
            ax.axhline(
                100 * rows[settings.reference]["test_error_mean"],
                color="0.5",
                linewidth=0.8,
                label=f"reference n={settings.small_batch}",
            )
        if predicted is not None:
            ax.axvline(
                predicted,
                color="C2",
                linestyle="--",
                label=f"B_simple over training ≈ {predicted:.0f}",
            )
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="batch kn (rate kη for SGD, gradual warmup)",
            ylabel="final test error (%)",
        )
        ax.set_xscale("log", base=2)
        ax.set_title(
            f"Test error against batch size, {settings.epochs} epochs each "
            "(Goyal et al. Figure 1)",
            fontsize=10,
        )
        ax.legend(fontsize=8)

    # 2. B_simple per epoch along the runs.
    with report.figure(paths[1], figsize=(7, 4.5)) as (_, ax):
        epochs = np.arange(1, settings.epochs + 1)
        configs = [c for c in rows if settings.tracks_noise_scale(c)]
        cmap = report.pyplot().get_cmap("viridis")
        sgd_configs = [c for c in configs if rows[c]["optimizer"] == "sgd"]
        for config in configs:
            curves = [
                report.padded(r["noise_scale"], settings.epochs)
                for r in results
                if r["config"] == config and "noise_scale" in r
            ]
            if not curves:
                continue
            with np.errstate(all="ignore"):
                values = np.asarray(curves, np.float64)
                values[values <= 0] = np.nan  # |G|² estimate at or below 0: undefined
                mean = np.nanmean(values, axis=0) if np.isfinite(values).any() else None
            if mean is None:
                continue
            optimizer, batch = parse_config(config)
            if optimizer == "sgd":
                shade = sgd_configs.index(config) / max(len(sgd_configs) - 1, 1)
                color: Any = cmap(0.9 * shade)
                linestyle, alpha = "-", 1.0
            else:
                color, linestyle, alpha = COLORS["lars"], "--", 0.6
            ax.plot(
                epochs,
                mean,
                color=color,
                linestyle=linestyle,
                alpha=alpha,
                label=f"{OPTIMIZER_LABELS[optimizer]} kn={batch}",
            )
        if predicted is not None:
            ax.axhline(
                predicted, color="C2", linestyle=":", label="B_simple over training"
            )
        report.mark_epochs(
            ax, (settings.warmup_epochs, *settings.milestones), grey="0.85"
        )
        ax.set(yscale="log", xlabel="epoch", ylabel="B_simple = tr(Σ) / |G|²")
        ax.set_title(
            "Gradient noise scale along training (per epoch, mean over seeds); "
            "dotted: end of warmup, ×0.1 decays",
            fontsize=9,
        )
        ax.legend(fontsize=7, ncol=2)

    # 3. Shallue et al.: steps to the target error against the batch.
    with report.figure(paths[2], figsize=(7, 4.5)) as (_, ax):
        for optimizer in settings.optimizers:
            mine = [
                r
                for r in _by_batch(rows, optimizer)
                if r["steps_to_target"] is not None
            ]
            if mine:
                ax.plot(
                    [r["batch_size"] for r in mine],
                    [r["steps_to_target"] for r in mine],
                    color=COLORS[optimizer],
                    marker=MARKERS[optimizer],
                    label=OPTIMIZER_LABELS[optimizer] + " (median over seeds)",
                )
        ref = rows.get(settings.reference)
        if ref is not None and ref["steps_to_target"] is not None:
            line = np.asarray(sorted({r["batch_size"] for r in rows.values()}), float)
            ax.plot(
                line,
                ref["steps_to_target"] * settings.small_batch / line,
                color="0.5",
                linestyle="--",
                label="perfect scaling (slope −1 from the reference)",
            )
        fit = a.get("mccandlish") or {}
        if fit.get("b_crit") is not None:
            ax.plot(
                fit["batches"],
                fit["steps"],
                color="C3",
                linewidth=1,
                label=f"McCandlish et al.'s fit, B_crit ≈ {fit['b_crit']:.0f}",
            )
            ax.axvline(fit["b_crit"], color="C3", linestyle="--", linewidth=0.8)
        if fit.get("b_simple") is not None:
            ax.axvline(
                fit["b_simple"],
                color="C2",
                linestyle=":",
                label=f"B_simple up to the target ≈ {fit['b_simple']:.0f}",
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set(xlabel="batch kn", ylabel="steps to the target")
        ax.set_title(
            f"Steps until the test error reaches {100 * settings.target_error:g}% "
            "(Shallue et al. 2019)",
            fontsize=10,
        )
        ax.legend(fontsize=8)
    return paths


EXPERIMENT = Experiment(
    name="batch-size",
    description=(
        "How large can the batch be? Goyal et al. 2017's Figure 1 on MNIST-1D: test "
        "error against the batch kn = n·2^j with linear scaling and gradual warmup, "
        "the gradient noise scale B_simple (McCandlish et al. 2018) measured along "
        "the runs, LARS (You et al. 2017) at the large batches, and the steps to a "
        "target error (Shallue et al. 2019)."
    ),
    quick={
        "samples": 2560,
        "epochs": 3,
        "warmup_epochs": 1.0,
        "milestones": "2",
        "seeds": 1,
        "batches": "32,256",
        "lars_batches": "256",
        "target_error": 50.0,
    },
    anchors=ANCHORS,
    settings_type=Settings,
    add_arguments=add_arguments,
    settings=from_flags,
    check=check,
    train_run=train_run,
    summarize=summarize,
    table=markdown_table,
    notes=notes,
    figures=plot,
)
