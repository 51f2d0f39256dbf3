"""The warmup experiment (the default of ``python -m optax_warmup.demo``).

Goyal et al. 2017's comparison (Table 1 and Figure 2), scaled down: a small 1-D
ResNet (``model.small_resnet``) trained on MNIST-1D in four configurations, each for
the same number of epochs with the learning rate divided by 10 at the same epochs:

1. ``reference``: the small batch n with learning rate η;
2. ``no_warmup``: the large batch kn with the linearly scaled rate kη from step 0;
3. ``constant_warmup``: kn, η for the warmup epochs, then kη;
4. ``gradual_warmup``: kn, η rising linearly to kη over the warmup epochs.

Everything else is the library's recipe: ``ow.goyal_sgd`` (momentum 0.9, weight decay
that skips BatchNorm parameters and biases), ``ow.smoothed_cross_entropy``, zero-γ
initialization, and BatchNorm statistics over groups of n examples inside the large
batch (ghost BatchNorm), as Goyal's workers computed them.

The report: the final test error per configuration (mean ± std over seeds, and its
shift from the reference with a 90% interval and a p-value) laid out like Goyal's
Table 1, Goyal's four findings from that table, each tested on the seeds
(``findings``),
``training_error.png`` (the training error per epoch of each large-batch
configuration against the reference, their Figure 2 layout) and
``lr_schedules.png`` (every configuration's learning-rate schedule, whole and its
first epochs).

This module is the whole experiment, ``EXPERIMENT``: its configurations and
settings, one run, its flags, the analysis and the report.

References:
  Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
  arXiv:1706.02677.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax
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


class Config(NamedTuple):
    """One configuration: a row of the table."""

    batch: Literal["small", "large"]  # n or kn
    warmup: Literal["none", "constant", "gradual"]  # ow.goyal_sgd's warmup
    label: str  # the row's label


CONFIGS: dict[str, Config] = {
    "reference": Config("small", "none", "small batch n (reference)"),
    "no_warmup": Config("large", "none", "kn, no warmup"),
    "constant_warmup": Config("large", "constant", "kn, constant warmup"),
    "gradual_warmup": Config("large", "gradual", "kn, gradual warmup"),
}
REFERENCE = "reference"

# What the report claims, fixed before any run. Each finding of Goyal's Table 1 is
# tested with the distribution-free interval of ``stats.shift`` at CONFIDENCE, and
# "gradual warmup holds the reference's error" means that the interval of its shift
# from the reference ends below TOLERANCE (Goyal: 23.74 against 23.60, "within
# 0.14%" of an error 30 times ours; here an error near 0.8% and 0.3 percentage
# points, somewhat below the typical cost of no warmup).
CONFIDENCE = 0.9
TOLERANCE = 0.003
DEFAULT_SEEDS = 6  # the fewest for which one far seed cannot move an end (findings)

ANCHORS = {
    "goyal_2017_table_1": {
        "what": "ResNet-50 on ImageNet, top-1 error %, mean ± std of 5 runs",
        "reference (kn=256, η=0.1)": "23.60 ± 0.12",
        "no warmup (kn=8k, η=3.2)": "24.84 ± 0.37",
        "constant warmup (kn=8k)": "25.88 ± 0.56",
        "gradual warmup (kn=8k)": "23.74 ± 0.09",
    },
    "mnist1d_paper_cnn_test_accuracy_percent": 94,
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The settings shared by every run (see ``--help``)."""

    small_batch: int = 32
    large_batch: int = 1024
    lr: float = 0.1
    epochs: int = 30
    warmup_epochs: float = 5.0
    milestones: tuple[float, ...] = (10.0, 20.0, 27.0)
    weight_decay: float = 1e-4
    momentum: float = 0.9
    label_smoothing: float = 0.1
    widths: tuple[int, ...] = (8, 16, 32)

    def __post_init__(self):  # lists (from JSON, say) become tuples: hashable
        object.__setattr__(self, "milestones", tuple(map(float, self.milestones)))
        object.__setattr__(self, "widths", tuple(map(int, self.widths)))

    def configs(self) -> list[str]:
        """Every configuration, in the order of Goyal's table."""
        return list(CONFIGS)

    def batch_size(self, config: str) -> int:
        """n for the reference, kn for the others."""
        return (
            self.small_batch if CONFIGS[config].batch == "small" else self.large_batch
        )

    def peak_lr(self, config: str) -> float:
        """The rate after the warmup: ``ow.linear_scaling_rule`` from η at n."""
        rate = ow.linear_scaling_rule(
            self.lr, self.batch_size(config), self.small_batch
        )
        return float(np.asarray(rate))

    def _schedule_args(self, config: str) -> dict[str, Any]:
        """The arguments that ``goyal_schedule`` and ``goyal_sgd`` share."""
        return {
            "batch_size": self.batch_size(config),
            "base_lr": self.lr,
            "base_batch_size": self.small_batch,
            "warmup_epochs": self.warmup_epochs,
            "milestones": self.milestones,
            "warmup": CONFIGS[config].warmup,
        }

    def optimizer(
        self, config: str, steps_per_epoch: int
    ) -> optax.GradientTransformation:
        """``ow.goyal_sgd`` for ``config``: η at batch n, scaled to its batch."""
        return ow.goyal_sgd(
            steps_per_epoch=steps_per_epoch,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            **self._schedule_args(config),
        )

    def schedule(self, config: str, steps_per_epoch: int) -> optax.Schedule:
        """The learning-rate schedule of ``optimizer(config, steps_per_epoch)``."""
        return ow.goyal_schedule(
            steps_per_epoch=steps_per_epoch, **self._schedule_args(config)
        )

    def model(self, seed: int) -> nnx.Module:
        """The zero-γ ``SmallResNet1D`` with ghost BatchNorm over groups of n."""
        return small_resnet(self.widths, self.small_batch, seed)


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

    Args:
      settings: the settings.
      config: a key of ``CONFIGS``.
      seed: seeds the initialization and the order of the examples (the same seed
        gives every configuration the same initial weights).
      data: the arrays of ``data.load``.
      mesh: the devices that the batch is sharded over (default: all).
      on_epoch: called as ``on_epoch(epoch, test_error)`` after each epoch.

    Returns:
      ``training.run_result``: what the run was (``config``, ``seed``,
      ``batch_size``), its final errors (``final_test_error``: Goyal's median of
      the last 5 epochs) and the curves of ``training.train_classifier``
      (``train_loss``, ``train_error``, ``test_error``, ``lr``: ``ow.current_lr``
      after each epoch's last step).
    """
    batch = settings.batch_size(config)
    steps = steps_per_epoch(len(data["y_train"]), batch)
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
        step_key=(settings, config, steps),
    )
    return run_result(curves, config=config, seed=seed, batch_size=batch)


# --- the command line -------------------------------------------------------------

# The library's arguments that this experiment's flags set (besides the recipe's).
_FLAG_OF = {"batch_size": "--large-batch"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe's flags, then ``--large-batch``; 6 seeds by default."""
    d = Settings()
    parser.set_defaults(seeds=DEFAULT_SEEDS)
    flags.add_recipe_arguments(parser, d)
    a = parser.add_argument_group("the warmup experiment").add_argument
    a("--large-batch", type=int, default=d.large_batch, help="kn: a multiple of n")


def from_flags(args: argparse.Namespace) -> Settings:
    """The settings of the parsed flags; ``FlagError`` for a value that cannot
    work."""
    milestones = flags.check_recipe_arguments(args)
    flags.check_at_least_one(args, "large_batch")
    if args.large_batch % args.small_batch:
        raise FlagError(
            "--large-batch",
            f"{args.large_batch} is not a multiple of --small-batch {args.small_batch}",
        )
    return Settings(
        **{**flags.settings_fields(args, Settings), "milestones": milestones}
    )


def check(settings: Settings, data: Arrays, devices: int) -> None:
    """``FlagError`` unless every configuration can train on ``data`` over
    ``devices``, the optimizer's own checks included."""
    n_train = len(data["y_train"])
    flags.check_batches(
        {"--large-batch": [settings.batch_size(c) for c in CONFIGS]},
        settings.small_batch,
        n_train,
        devices,
    )
    for config in CONFIGS:
        with flags.library_checks(_FLAG_OF):
            settings.optimizer(config, n_train // settings.batch_size(config))


# --- the analysis and the report --------------------------------------------------


def summarize(results: Sequence[Result], settings: Settings) -> Summary:
    """Per configuration: final test error mean ± std over seeds, and the gap.

    Each configuration's final errors are compared with the reference's: the gap
    of the means, its standard error and Welch's two-sided p-value (None for the
    reference itself and with a single seed), and ``shift_vs_reference``, the
    ``stats.shift`` of its errors over the reference's at ``CONFIDENCE`` (a
    ``Shift`` as a dict; absent for the reference). ``findings(summary)`` reads
    the shifts between the other configurations from ``test_errors``.
    """
    summary: Summary = {}
    for name, config in CONFIGS.items():
        runs = [r for r in results if r["config"] == name]
        if not runs:
            continue
        errors = [r["final_test_error"] for r in runs]
        mean, std = stats.mean_std(errors)
        train_mean, train_std = stats.mean_std([r["final_train_error"] for r in runs])
        summary[name] = {
            "label": config.label,
            "batch_size": settings.batch_size(name),
            "peak_lr": settings.peak_lr(name),
            "warmup": config.warmup,
            "test_error_mean": mean,
            "test_error_std": std,
            "test_errors": errors,
            "train_error_mean": train_mean,
            "train_error_std": train_std,
            "diverged_runs": sum(r["diverged"] for r in runs),
        }
    if REFERENCE in summary:
        reference = summary[REFERENCE]["test_errors"]
        for name, s in summary.items():
            s.update(stats.versus_reference(s["test_errors"], reference))
            if name == REFERENCE:
                s["p_value"] = None
            else:
                shift = _shift(s, summary[REFERENCE])._asdict()
                s["shift_vs_reference"] = {  # JSON has no infinity: None for no end
                    k: None if isinstance(v, float) and math.isinf(v) else v
                    for k, v in shift.items()
                }
    return summary


def _shift(a: dict[str, Any], b: dict[str, Any]) -> stats.Shift:
    """The shift of configuration ``a``'s final errors over ``b``'s."""
    return stats.shift(a["test_errors"], b["test_errors"], confidence=CONFIDENCE)


class Finding(NamedTuple):
    """One finding of Goyal's Table 1, tested on this run's seeds.

    Attributes:
      claim: the finding, e.g. ``"kn without warmup ends above the reference"``.
      goyal: Goyal's numbers for it (top-1 error %, ResNet-50, kn = 8k).
      verdict: ``"holds"`` (the interval of the shift is on the finding's side of
        its bound), ``"fails"`` (on the other side) or ``"not shown"`` (across the
        bound, or the seeds are too few for an interval at ``CONFIDENCE``).
      shift: the shift (``stats.Shift``) that decides it.
    """

    claim: str
    goyal: str
    verdict: str
    shift: stats.Shift


def _verdict(shift: stats.Shift, below: bool, bound: float) -> str:
    """Whether the interval lies below (or above) ``bound``, across, or beyond.

    The ends and the bound are compared rounded to 1e-9: errors lie on the grid of
    the test set (k / 6000), on which the tolerance lies too, and an end exactly on
    the bound counts against the finding, whatever the last bit of the subtraction.
    """
    ends = (shift.low, shift.high) if below else (-shift.high, -shift.low)
    low, high = (round(end, 9) for end in ends)
    bound = round(bound if below else -bound, 9)
    if high < bound:
        return "holds"
    return "fails" if low >= bound else "not shown"


def findings(summary: Summary) -> list[Finding]:
    """Goyal's four findings of Table 1, each decided by a shift's interval.

    With ``shift(a, b)`` the ``stats.shift`` of configuration a's final errors over
    b's, at ``CONFIDENCE``, each finding holds when the interval
    ``[low, high]`` lies on its side of the bound:

    1. no warmup ends above the reference: ``shift(no_warmup, reference).low > 0``;
    2. constant warmup ends above no warmup: ``shift(constant, no_warmup).low > 0``;
    3. gradual warmup ends at most ``TOLERANCE`` above the reference:
       ``shift(gradual, reference).high < TOLERANCE``;
    4. gradual warmup ends below no warmup: ``shift(gradual, no_warmup).high < 0``.

    A finding fails when its interval lies wholly on the other side of the bound,
    and is not shown otherwise. A finding whose configurations are missing from
    ``summary`` is left out.

    Why 6 seeds by default: each interval is a pair of order statistics of the 36
    differences between two configurations' seeds, the 7 most extreme on either
    side left out at 90% (``stats.shift``). A seed far from the others (one that
    diverges, or lands on a bad minimum) has its 6 differences among the most
    extreme, so both ends are other seeds' differences, however far it lands.
    With 5 seeds a side (the 4 most extreme of 25 left out) its own difference is
    an end; with 3 (none left out) the ends are the extreme differences.
    """
    # (a, b, whether the finding is shift(a, b) below the bound, bound, claim,
    # Goyal's numbers)
    tests = [
        (
            "no_warmup",
            REFERENCE,
            False,
            0.0,
            "kn without warmup ends above the reference",
            "24.84 ± 0.37 against 23.60 ± 0.12",
        ),
        (
            "constant_warmup",
            "no_warmup",
            False,
            0.0,
            "kn with constant warmup ends above kn without warmup",
            "25.88 ± 0.56 against 24.84 ± 0.37",
        ),
        (
            "gradual_warmup",
            REFERENCE,
            True,
            TOLERANCE,
            "kn with gradual warmup ends "
            f"at most {100 * TOLERANCE:g} pp above the reference",
            "23.74 ± 0.09 against 23.60 ± 0.12",
        ),
        (
            "gradual_warmup",
            "no_warmup",
            True,
            0.0,
            "kn with gradual warmup ends below kn without warmup",
            "23.74 ± 0.09 against 24.84 ± 0.37",
        ),
    ]
    out = []
    for a, b, below, bound, claim, goyal in tests:
        if a in summary and b in summary:
            shift = _shift(summary[a], summary[b])
            out.append(Finding(claim, goyal, _verdict(shift, below, bound), shift))
    return out


def markdown_table(summary: Summary) -> str:
    """Goyal's Table 1 layout: one row per configuration, errors in percent."""
    header = [
        "configuration",
        "batch",
        "peak η",
        "test error (%)",
        f"shift vs reference (pp), {CONFIDENCE:.0%} interval",
        "p vs reference",
        "train error (%)",
    ]
    rows = []
    for s in summary.values():
        gap, p = "–", None
        if "shift_vs_reference" in s:
            stored = s["shift_vs_reference"]
            gap, p = _shift_cell(stored), stored["p_value"]
        diverged = f" ({s['diverged_runs']} diverged)" if s["diverged_runs"] else ""
        rows.append(
            [
                s["label"] + diverged,
                str(s["batch_size"]),
                f"{s['peak_lr']:.4g}",
                report.percent_pm(s["test_error_mean"], s["test_error_std"]),
                gap,
                report.p_cell(p),
                report.percent_pm(s["train_error_mean"], s["train_error_std"]),
            ]
        )
    return report.markdown_table(header, rows)


def _shift_cell(shift: Mapping[str, Any]) -> str:
    """``+0.40 [+0.25, +0.55]``: a shift (``Shift._asdict()``, or its JSON form with
    None for an infinite end) and its interval in percentage points."""
    ends = ", ".join(
        "–" if end is None or not np.isfinite(end) else f"{100 * end:+.2f}"
        for end in (shift["low"], shift["high"])
    )
    return f"{100 * shift['estimate']:+.2f} [{ends}]"


def notes(summary: Summary) -> list[str]:
    """What the shift and p columns are, then Goyal's findings and their verdicts."""
    lines = [
        "shift: the median of the differences between the configuration's seeds and "
        f"the reference's (Hodges–Lehmann), with its distribution-free "
        f"{CONFIDENCE:.0%} interval (– where the seeds are too few for one); p: "
        "two-sided exact Mann–Whitney test of no shift",
    ]
    found = findings(summary)
    if found:
        lines.append(
            f"Goyal et al.'s Table 1 on these seeds (shift, {CONFIDENCE:.0%} interval):"
        )
        lines += [
            f"  {f.verdict:9}  {f.claim}: {_shift_cell(f.shift._asdict())} pp "
            f"(Goyal: {f.goyal})"
            for f in found
        ]
    return lines


COLORS = {
    "reference": "k",
    "no_warmup": "C3",
    "constant_warmup": "C1",
    "gradual_warmup": "C0",
}
STYLES = {"no_warmup": "--", "constant_warmup": "-.", "gradual_warmup": "-"}


def label(config: str, settings: Settings) -> str:
    """A legend label with the numbers, e.g. ``kn=1024, kη=3.2, gradual warmup``."""
    batch, warmup = settings.batch_size(config), CONFIGS[config].warmup
    if config == REFERENCE:
        return f"n={batch}, η={settings.lr:g} (reference)"
    return (
        f"kn={batch}, kη={settings.peak_lr(config):g}, "
        + ("no" if warmup == "none" else warmup)
        + " warmup"
    )


def plot(results: Sequence[Result], settings: Settings, out: Path) -> list[Path]:
    """Writes training_error.png and lr_schedules.png into ``out``.

    The schedules are drawn at the steps per epoch of the runs.
    """
    paths = [out / "training_error.png", out / "lr_schedules.png"]
    epochs = np.arange(1, settings.epochs + 1)

    def curves(config: str) -> np.ndarray:
        rows = [
            report.padded(r["train_error"], settings.epochs)
            for r in results
            if r["config"] == config
        ]
        return 100 * np.asarray(rows, np.float64)

    large = [c for c in CONFIGS if c != REFERENCE]
    with report.figure(
        paths[0], 1, len(large), figsize=(5 * len(large), 4), sharey=True
    ) as (fig, axes):
        for ax, config in zip(np.atleast_1d(axes), large, strict=True):
            for name in (REFERENCE, config):
                c = curves(name)
                if not c.size:
                    continue
                mean, low, high = np.nanmean(c, 0), np.nanmin(c, 0), np.nanmax(c, 0)
                ax.plot(epochs, mean, color=COLORS[name], label=label(name, settings))
                ax.fill_between(
                    epochs, low, high, color=COLORS[name], alpha=0.2, linewidth=0
                )
            report.mark_epochs(ax, (settings.warmup_epochs, *settings.milestones))
            ax.set(yscale="log", xlabel="epoch", title=label(config, settings))
            ax.legend(loc="upper right", fontsize=8)
        np.atleast_1d(axes)[0].set_ylabel(
            "training error (%): mean, min–max over seeds"
        )
        fig.suptitle(
            "Training error per epoch (mean over the epoch's batches, training "
            "mode); dotted: end of warmup and ×0.1 decays",
            fontsize=9,
        )

    steps_of = {r["config"]: r["steps_per_epoch"] for r in results}
    with report.figure(paths[1], 1, 2, figsize=(11, 4)) as (fig, axes):
        zoom = min(settings.epochs, 2 * max(settings.warmup_epochs, 1))
        for config in (c for c in CONFIGS if c in steps_of):
            spe = steps_of[config]
            steps = np.arange(settings.epochs * spe)
            lr = np.asarray(jax.vmap(settings.schedule(config, spe))(steps))
            style = dict(
                color=COLORS[config],
                linestyle=STYLES.get(config, "-"),
                drawstyle="steps-post",
            )
            axes[0].plot(steps / spe, lr, label=label(config, settings), **style)
            keep = steps / spe <= zoom
            axes[1].plot(steps[keep] / spe, lr[keep], **style)
        axes[0].set(yscale="log", xlabel="epoch", ylabel="learning rate per step")
        axes[0].set_title("ow.goyal_schedule of each run (log scale)", fontsize=10)
        axes[1].set(xlabel="epoch", ylabel="learning rate per step")
        axes[1].set_title(f"the first {zoom:g} epochs (linear scale)", fontsize=10)
        axes[0].legend(fontsize=8)
    return paths


EXPERIMENT = Experiment(
    name="warmup",
    description=(
        "Goyal et al. 2017's warmup comparison (Table 1) on MNIST-1D: a small batch "
        "n with rate η against a large batch kn with the linearly scaled rate kη and "
        "no, constant or gradual warmup; same epochs, ×0.1 decays at the same epochs."
    ),
    quick={
        "samples": 4000,
        "epochs": 4,
        "warmup_epochs": 1.0,
        "milestones": "2,3",
        "seeds": 1,
        "large_batch": 256,
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
