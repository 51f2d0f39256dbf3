"""The batch-size experiment: how large can the batch be? (``--experiment batch-size``)

Goyal et al. 2017's Figure 1, scaled down: the small 1-D ResNet of the warmup
experiment trained on MNIST-1D at batches kn = n·2^j, from the reference n up to
4096, each for the same number of epochs with the linear scaling rule (peak rate
kη), a gradual warmup and the same ×0.1 decays, BatchNorm statistics over groups of
n (ghost BatchNorm) in every run. Along each run with kn > n the gradient noise
scale B_simple of McCandlish et al. 2018 is measured in the train step
(``ow.value_and_grad_by_group`` over the ghost BatchNorm groups,
``ow.track_noise_scale`` in the optimizer) and read once per epoch. At the large
batches the same schedule also runs with LARS (You et al. 2017; ``ow.lars``, BatchNorm
parameters and biases masked from decay and trust ratio), whose peak rate is one
number, tuned at one batch and kept for the others (You et al. raise it with the batch).

This module holds the runs (configurations, settings, flags, one run);
``batch_size_report`` the summary (breakdown, predicted critical batch,
steps to the target error), the table and the figures.

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
from optax_warmup.demo.warmup import (
    _floats,
    _ints,
    _shown,
    add_model_arguments,
    check_model_arguments,
    schedule_milestones,
)

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
        return ow.models.SmallResNet1D(
            num_classes=NUM_CLASSES,
            widths=self.widths,
            batch_norm_group_size=self.small_batch,
            rngs=nnx.Rngs(seed),
        )


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

    Returns the curves of ``training.train_classifier`` (with, for kn > n, the
    tracker's ``noise_scale``, ``g2`` and ``trace_sigma`` after each epoch), the
    final errors (``final_test_error``: Goyal's median of the last 5 epochs) and
    what the run was (``config``, ``optimizer``, ``seed``, ``batch_size``).
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
    return {
        "config": config,
        "optimizer": optimizer,
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


def _optimizers(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(OPTIMIZERS)}, got {text!r}"
        )
    return names


_FLAG_OF = {
    "base_lr": "--lr",
    "learning_rate": "--lr",
    "warmup_epochs": "--warmup-epochs",
    "milestones": "--milestones",
    "weight_decay": "--weight-decay",
    "trust_coefficient": "--trust-coefficient",
    "momentum": "--momentum",
}


class BatchSizeExperiment:
    """Goyal's Figure 1, the noise scale and LARS on MNIST-1D: an ``Experiment``."""

    name = "batch-size"
    description = (
        "How large can the batch be? Goyal et al. 2017's Figure 1 on MNIST-1D: test "
        "error against the batch kn = n·2^j with linear scaling and gradual warmup, "
        "the gradient noise scale B_simple (McCandlish et al. 2018) measured along "
        "the runs, LARS (You et al. 2017) at the large batches, and the steps to a "
        "target error (Shallue et al. 2019)."
    )
    quick: Mapping[str, Any] = {
        "samples": 2560,
        "epochs": 3,
        "warmup_epochs": 1.0,
        "milestones": "2",
        "seeds": 1,
        "batches": "32,256",
        "lars_batches": "256",
        "target_error": 50.0,
    }
    anchors: Mapping[str, Any] = ANCHORS

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        d = Settings()
        parser.set_defaults(samples=DEFAULT_SAMPLES, seeds=DEFAULT_SEEDS)
        a = parser.add_argument_group("the batch-size experiment").add_argument
        a(
            "--small-batch",
            type=int,
            default=d.small_batch,
            help="n: the reference batch, and the ghost BatchNorm group in every run",
        )
        a(
            "--batches",
            type=_ints,
            default=_shown(d.batches),
            help="comma-separated batches kn of the SGD runs, multiples of n; n (the "
            "reference) among them",
        )
        a("--lr", type=float, default=d.lr, help="η: the SGD rate at batch n")
        a("--epochs", type=int, default=d.epochs, help="epochs of every run")
        a(
            "--warmup-epochs",
            type=float,
            default=d.warmup_epochs,
            help="gradual warmup length in epochs (every run)",
        )
        a(
            "--milestones",
            type=_floats,
            default=None,
            help="comma-separated epochs of the ×0.1 decays, each before the end of "
            "training (default: 1/3, 2/3 and 8/9 of --epochs)",
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
            type=_ints,
            default=_shown(d.lars_batches),
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
        add_model_arguments(a, d)

    def settings(self, args: argparse.Namespace) -> Settings:
        for flag in ("small_batch", "epochs"):
            if getattr(args, flag) < 1:
                raise FlagError(
                    "--" + flag.replace("_", "-"),
                    f"must be at least 1, got {getattr(args, flag)}",
                )
        n = args.small_batch
        for flag in ("batches", "lars_batches"):
            values = getattr(args, flag)
            name = "--" + flag.replace("_", "-")
            bad = [b for b in values if b < n or b % n]
            if bad:
                raise FlagError(
                    name, f"{_shown(bad)}: not a multiple of --small-batch {n}"
                )
            if len(set(values)) != len(values) or list(values) != sorted(values):
                raise FlagError(name, f"{_shown(values)} must be strictly increasing")
        if "sgd" in args.optimizers and n not in args.batches:
            raise FlagError(
                "--batches",
                f"{_shown(args.batches)} must include the reference batch "
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
        check_model_arguments(args)
        return Settings(
            small_batch=n,
            batches=args.batches,
            lr=args.lr,
            epochs=args.epochs,
            warmup_epochs=args.warmup_epochs,
            milestones=schedule_milestones(args),
            weight_decay=args.weight_decay,
            label_smoothing=args.label_smoothing,
            widths=args.widths,
            optimizers=args.optimizers,
            lars_batches=args.lars_batches if "lars" in args.optimizers else (),
            lars_lr=args.lars_lr,
            trust_coefficient=args.trust_coefficient,
            target_error=args.target_error / 100,
        )

    def load_settings(self, stored: Mapping[str, Any]) -> Settings:
        return Settings(**stored)

    def runs(self, settings: Settings, seeds: Sequence[int]) -> list[Run]:
        return [Run(c, seed) for seed in seeds for c in settings.configs()]

    def check(self, settings: Settings, data: Arrays, devices: int) -> None:
        n_train = len(data["y_train"])
        for flag, values in (
            ("--batches", settings.batches),
            ("--lars-batches", settings.lars_batches),
        ):
            if values and values[-1] > n_train:
                raise FlagError(
                    flag,
                    f"{values[-1]} exceeds the {n_train} training sequences of "
                    "--samples",
                )
        for config in settings.configs():  # ghost BatchNorm groups stay in a process
            check_groups(
                parse_config(config)[1],
                settings.small_batch,
                jax.process_count(),
                flag="--batches",
            )
        if settings.small_batch % devices:
            raise FlagError(
                "--small-batch",
                f"{settings.small_batch} does not split over the {devices} devices",
            )
        for config in settings.configs():  # the library's own checks, up front
            _, batch = parse_config(config)
            try:
                settings.optimizer(config, n_train // batch)
            except ValueError as error:
                argument = str(error).split(" ", 1)[0]
                flag = _FLAG_OF.get(argument, argument)
                if flag == "--lr" and config.startswith("lars"):
                    flag = "--lars-lr"
                raise FlagError(flag, str(error)) from None

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

    # The report imports this module: imported when needed.
    def summarize(self, settings: Settings, results: Sequence[Result]) -> Summary:
        from optax_warmup.demo import batch_size_report

        return batch_size_report.summarize(results, settings)

    def table(self, summary: Summary) -> str:
        from optax_warmup.demo import batch_size_report

        return batch_size_report.markdown_table(summary)

    def notes(self, summary: Summary) -> list[str]:
        from optax_warmup.demo import batch_size_report

        return batch_size_report.notes(summary)

    def figures(
        self, settings: Settings, results: Sequence[Result], n_train: int, out: Path
    ) -> list[Path]:
        from optax_warmup.demo import batch_size_report

        return batch_size_report.plot(results, settings, out)


EXPERIMENT = BatchSizeExperiment()
