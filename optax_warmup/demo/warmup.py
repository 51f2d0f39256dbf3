"""The warmup experiment (the default of ``python -m optax_warmup.demo``).

Goyal et al. 2017's comparison (Table 1 and Figure 2), scaled down: a small 1-D
ResNet (``ow.models.SmallResNet1D``) trained on MNIST-1D in four configurations,
each for the same number of epochs with the learning rate divided by 10 at the same
epochs:

1. ``reference``: the small batch n with learning rate η;
2. ``no_warmup``: the large batch kn with the linearly scaled rate kη from step 0;
3. ``constant_warmup``: kn, η for the warmup epochs, then kη;
4. ``gradual_warmup``: kn, η rising linearly to kη over the warmup epochs.

Everything else is the library's recipe: ``ow.goyal_sgd`` (momentum 0.9, weight decay
that skips BatchNorm parameters and biases), ``ow.smoothed_cross_entropy``, zero-γ
initialization, and BatchNorm statistics over groups of n examples inside the large
batch (ghost BatchNorm), as Goyal's workers computed them.

This module holds the runs (configurations, settings, flags, one run) and the
``Experiment`` that ``__main__`` drives; ``warmup_report`` the summary, the table and
the figures.

References:
  Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
  arXiv:1706.02677.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

import optax_warmup as ow
from optax_warmup.demo import report
from optax_warmup.demo.data import NUM_CLASSES
from optax_warmup.demo.distributed import check_groups
from optax_warmup.demo.experiment import (
    Arrays,
    FlagError,
    OnEpoch,
    Result,
    Run,
    Summary,
)
from optax_warmup.demo.training import steps_per_epoch, train_classifier


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
        return ow.models.SmallResNet1D(
            num_classes=NUM_CLASSES,
            widths=self.widths,
            batch_norm_group_size=self.small_batch,
            rngs=nnx.Rngs(seed),
        )


def default_milestones(epochs: int) -> tuple[float, ...]:
    """Goyal's decays at epochs 30, 60 and 80 of 90, scaled to ``epochs``.

    >>> default_milestones(90)
    (30.0, 60.0, 80.0)
    >>> default_milestones(30)
    (10.0, 20.0, 27.0)
    """
    return tuple(float(round(epochs * f)) for f in (30 / 90, 60 / 90, 80 / 90))


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
      The curves of ``training.train_classifier`` (``train_loss``, ``train_error``,
      ``test_error``, ``lr``: ``ow.current_lr`` after each epoch's last step), the
      run's final errors (``final_test_error``: Goyal's median of the last 5
      epochs) and what it was (``config``, ``seed``, ``batch_size``).
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
    return {
        "config": config,
        "seed": seed,
        "batch_size": batch,
        "steps_per_epoch": curves.pop("steps_per_epoch"),
        "diverged": curves.pop("diverged"),
        "final_test_error": report.final_error(curves["test_error"]),
        "last_test_error": curves["test_error"][-1],
        "final_train_error": curves["train_error"][-1],
        "seconds": curves.pop("seconds"),
        **curves,
    }


# --- the command line -------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _shown(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


def add_model_arguments(add: Callable[..., Any], defaults: Any) -> None:
    """The flags of the model and its loss, shared by the experiments:
    ``--weight-decay``, ``--label-smoothing`` and ``--widths``, given to ``add``
    (an argument group's ``add_argument``)."""
    add(
        "--weight-decay",
        type=float,
        default=defaults.weight_decay,
        help="L2 on conv/dense kernels",
    )
    add(
        "--label-smoothing",
        type=float,
        default=defaults.label_smoothing,
        help="α of the cross-entropy",
    )
    add(
        "--widths",
        type=_ints,
        default=_shown(defaults.widths),
        help="SmallResNet1D stage widths, comma-separated (three)",
    )


def check_model_arguments(args: argparse.Namespace) -> None:
    """``FlagError`` for a label smoothing outside [0, 1] or widths that are not
    three positive integers."""
    if not 0 <= args.label_smoothing <= 1:
        raise FlagError(
            "--label-smoothing", f"must be in [0, 1], got {args.label_smoothing}"
        )
    if len(args.widths) != 3 or min(args.widths) < 1:
        raise FlagError(
            "--widths", f"expected three positive widths, got {_shown(args.widths)}"
        )


def schedule_milestones(args: argparse.Namespace) -> tuple[float, ...]:
    """``--milestones`` (default: ``default_milestones(--epochs)``), checked against
    ``--epochs`` and ``--warmup-epochs``; ``FlagError`` for a schedule that cannot
    work (a decay at or after the end, or before the warmup ends)."""
    milestones = args.milestones
    given = milestones is not None
    if not given:
        milestones = default_milestones(args.epochs)
    where = "" if given else f" (the default for --epochs {args.epochs})"
    if any(b <= a for a, b in itertools.pairwise(milestones)):
        raise FlagError(
            "--milestones",
            f"milestones {_shown(milestones)}{where} must be strictly increasing",
        )
    if milestones and milestones[0] <= 0:
        raise FlagError(
            "--milestones",
            f"milestones {_shown(milestones)}{where} must be > 0 (epochs)",
        )
    if milestones and milestones[-1] >= args.epochs:
        raise FlagError(
            "--milestones",
            f"milestones {_shown(milestones)}{where}: a decay at or after the "
            f"end of training (--epochs {args.epochs}) never takes effect",
        )
    if milestones and args.warmup_epochs >= milestones[0]:
        raise FlagError(
            "--warmup-epochs",
            f"the warmup of {args.warmup_epochs:g} epochs must end before the "
            f"first decay of --milestones {_shown(milestones)}{where}",
        )
    return tuple(milestones)


# Library arguments as the flags that set them, for the optimizer's own checks.
_FLAG_OF = {
    "base_lr": "--lr",
    "base_batch_size": "--small-batch",
    "batch_size": "--large-batch",
    "warmup_epochs": "--warmup-epochs",
    "milestones": "--milestones",
    "weight_decay": "--weight-decay",
}


class WarmupExperiment:
    """Goyal's Table 1 on MNIST-1D: the ``Experiment`` of this module."""

    name = "warmup"
    description = (
        "Goyal et al. 2017's warmup comparison (Table 1) on MNIST-1D: a small batch "
        "n with rate η against a large batch kn with the linearly scaled rate kη and "
        "no, constant or gradual warmup; same epochs, ×0.1 decays at the same epochs."
    )
    quick: Mapping[str, Any] = {
        "samples": 4000,
        "epochs": 4,
        "warmup_epochs": 1.0,
        "milestones": "2,3",
        "seeds": 1,
        "large_batch": 256,
    }
    anchors: Mapping[str, Any] = ANCHORS

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        d = Settings()
        a = parser.add_argument_group("the warmup experiment").add_argument
        a(
            "--small-batch",
            type=int,
            default=d.small_batch,
            help="n: the reference batch, and the ghost BatchNorm group in every run",
        )
        a("--large-batch", type=int, default=d.large_batch, help="kn: a multiple of n")
        a("--lr", type=float, default=d.lr, help="η: the rate at batch n")
        a("--epochs", type=int, default=d.epochs, help="epochs of every run")
        a(
            "--warmup-epochs",
            type=float,
            default=d.warmup_epochs,
            help="warmup length in epochs",
        )
        a(
            "--milestones",
            type=_floats,
            default=None,
            help="comma-separated epochs of the ×0.1 decays, each before the end of "
            "training (default: 1/3, 2/3 and 8/9 of --epochs, Goyal's 30, 60, 80 "
            "of 90)",
        )
        add_model_arguments(a, d)

    def settings(self, args: argparse.Namespace) -> Settings:
        for flag in ("small_batch", "large_batch", "epochs"):
            if getattr(args, flag) < 1:
                raise FlagError(
                    "--" + flag.replace("_", "-"),
                    f"must be at least 1, got {getattr(args, flag)}",
                )
        if args.large_batch % args.small_batch:
            raise FlagError(
                "--large-batch",
                f"{args.large_batch} is not a multiple of --small-batch "
                f"{args.small_batch}",
            )
        milestones = schedule_milestones(args)
        check_model_arguments(args)
        return Settings(
            small_batch=args.small_batch,
            large_batch=args.large_batch,
            lr=args.lr,
            epochs=args.epochs,
            warmup_epochs=args.warmup_epochs,
            milestones=milestones,
            weight_decay=args.weight_decay,
            label_smoothing=args.label_smoothing,
            widths=args.widths,
        )

    def load_settings(self, stored: Mapping[str, Any]) -> Settings:
        return Settings(**stored)

    def runs(self, settings: Settings, seeds: Sequence[int]) -> list[Run]:
        return [Run(config, seed) for seed in seeds for config in CONFIGS]

    def check(self, settings: Settings, data: Arrays, devices: int) -> None:
        n_train = len(data["y_train"])
        if n_train < settings.large_batch:
            raise FlagError(
                "--large-batch",
                f"{settings.large_batch} exceeds the {n_train} training sequences "
                "of --samples",
            )
        for config in CONFIGS:  # ghost BatchNorm groups stay inside a process
            check_groups(
                settings.batch_size(config),
                settings.small_batch,
                jax.process_count(),
                flag="--large-batch",
            )
        if settings.small_batch % devices:
            raise FlagError(
                "--small-batch",
                f"{settings.small_batch} does not split over the {devices} devices",
            )
        for config in CONFIGS:  # the optimizer's own checks, before any training
            try:
                settings.optimizer(config, n_train // settings.batch_size(config))
            except ValueError as error:
                argument = str(error).split(" ", 1)[0]
                raise FlagError(_FLAG_OF.get(argument, argument), str(error)) from None

    def epochs(self, settings: Settings) -> int:
        return settings.epochs

    def train(
        self,
        settings: Settings,
        run: Run,
        data: Arrays,
        *,
        mesh: Mesh | None = None,
        on_epoch: OnEpoch | None = None,
    ) -> Result:
        return train_run(
            settings, run.config, run.seed, data, mesh=mesh, on_epoch=on_epoch
        )

    # The report imports this module's configurations: imported when needed.
    def summarize(self, settings: Settings, results: Sequence[Result]) -> Summary:
        from optax_warmup.demo import warmup_report

        return warmup_report.summarize(results, settings)

    def table(self, summary: Summary) -> str:
        from optax_warmup.demo import warmup_report

        return warmup_report.markdown_table(summary)

    def notes(self, summary: Summary) -> list[str]:
        others = [s.get("p_value") for k, s in summary.items() if k != REFERENCE]
        return [report.p_value_note(others)]

    def figures(
        self, settings: Settings, results: Sequence[Result], n_train: int, out: Path
    ) -> list[Path]:
        from optax_warmup.demo import warmup_report

        return warmup_report.plot(results, settings, n_train, out)


EXPERIMENT = WarmupExperiment()
