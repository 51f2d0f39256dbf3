"""The adaptive-batch experiment: fewer steps to the small batch's error?
(``--experiment adaptive-batch``)

Which schedule of the batch reaches the reference's test error (n = 32 at rate
η = 0.1, as in the other experiments) in the fewest optimizer steps, and at what
cost in examples? Every run trains the demo's model (``model.small_resnet``, ghost
BatchNorm over groups of n) one micro-batch of n examples at a time through
``ow.accumulate`` (``training.train_accumulated``: one compiled micro-step for
every batch), so the schedules differ only in how many micro-batches make an
update and in the rate:

- ``fixed-<kn>``: a constant batch kn with Goyal et al.'s recipe (linear scaling
  rule, gradual warmup, ×0.1 decays), as in the batch-size experiment;
- ``smith``: Smith et al. 2017's schedule: the reference's, with each ×0.1 decay
  replaced by a ×``smith_factor`` increase of the batch (capped at
  ``smith_max_batch``) and the rest of the factor as a decay of the rate, so
  that the rate over the batch falls ×0.1 at each milestone as the reference's;
- ``ramp``: ``ow.rampup_batch_size`` from n to ``ramp_batch`` over the first
  ``ramp_epochs`` epochs of examples, the rate following the batch by the linear
  rule (``ow.batch_scaled_rate`` on the reference's schedule, counted in samples);
- ``noise``: the batch follows the gradient noise scale B_simple measured from
  the micro-batches: n·2^j nearest B_simple, within [2n, ``noise_max_batch``]
  (B_simple needs two micro-batches), kept where the estimate is not finite or
  not positive; the rate follows the batch by the linear rule;
- ``adascale-<kn>``: ``ow.adascale`` around SGD at a constant batch kn on the
  reference's schedule, untuned, run until its scale-invariant progress τ
  reaches the reference's iterations.

Along every run the test error is evaluated after each 1/8 epoch of examples
(the curve), and B_simple's two terms are measured at every update with more
than one micro-batch (``ow.track_noise_scale``, fed by ``accumulate``).

The analysis (``summarize``): each run's final error (Goyal's median of the last
5 epochs; for AdaScale, of the last 5 of its 12 epochs of τ), its steps and
examples; the steps and examples to each target error (linear interpolation of
the curve); McCandlish et al.'s trade-off fitted over the fixed batches per
target (``stats.fit_critical_batch``) beside B_simple averaged over the same
stretch of training; and the headline: each schedule's steps and examples to the
reference's final error against the best fixed batch that reaches it.

This module is the whole experiment, ``EXPERIMENT``.

References:
  McCandlish, Kaplan, Amodei et al. 2018, An Empirical Model of Large-Batch
  Training, arXiv:1812.06162.
  Smith, Kindermans, Ying, Le 2017, Don't Decay the Learning Rate, Increase the
  Batch Size, arXiv:1711.00489.
  Johnson, Agrawal, Gu, Guestrin 2020, AdaScale SGD: A User-Friendly Algorithm
  for Distributed Training, arXiv:2007.05105.
  Merrill et al. 2025, Critical Batch Size Revisited, arXiv:2505.23971.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
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
from optax_warmup.demo.training import examples_progress, train_accumulated

# 20,480 sequences: 16,384 = 16 × 1024 for training, 4,096 for testing.
DEFAULT_SAMPLES = 20480
DEFAULT_SEEDS = 3
KINDS = ("fixed", "smith", "ramp", "noise", "adascale")
LABELS = {
    "smith": "Smith et al.",
    "ramp": "ramp",
    "noise": "noise-driven",
}


def kind_of(config: str) -> str:
    """``"fixed"`` of ``"fixed-256"``, ``"smith"`` of ``"smith"``."""
    return config.split("-", 1)[0]


def batch_of(config: str) -> int | None:
    """The constant batch of ``fixed-<kn>`` and ``adascale-<kn>``, else None."""
    batch = config.partition("-")[2]
    return int(batch) if batch else None


ANCHORS = {
    "mccandlish_2018": {
        "what": "the critical batch from the steps/examples trade-off to a target",
        "claim": "(S/S_min − 1)(E/E_min − 1) = 1, B_crit = E_min/S_min; B_simple "
        "predicts B_crit (within an order of magnitude in their tasks)",
    },
    "smith_2017": {
        "what": "increasing the batch instead of decaying the rate",
        "claim": "the same test accuracy after the same number of epochs, with "
        "fewer parameter updates",
    },
    "johnson_2020_adascale": {
        "what": "AdaScale SGD",
        "claim": "the reference's quality at a larger batch with the reference's "
        "schedule, no retuning",
    },
    "merrill_2025": {
        "what": "batch-size warmup guided by the measured critical batch (OLMo-1B)",
        "claim": "43% fewer gradient steps at a slightly better loss",
    },
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The settings shared by every run (see ``--help``)."""

    small_batch: int = 32
    lr: float = 0.1
    epochs: int = 12
    warmup_epochs: float = 2.0
    milestones: tuple[float, ...] = (4.0, 8.0, 11.0)
    weight_decay: float = 1e-4
    momentum: float = 0.9
    label_smoothing: float = 0.1
    widths: tuple[int, ...] = (8, 16, 32)
    batches: tuple[int, ...] = (32, 64, 128, 256, 512, 1024)
    smith_factor: int = 8
    smith_max_batch: int = 1024
    ramp_batch: int = 1024
    ramp_epochs: float = 4.0
    noise_max_batch: int = 1024
    noise_decay: float = 0.9
    adascale_batches: tuple[int, ...] = (256, 1024)
    target_errors: tuple[float, ...] = (0.05, 0.02)
    evals_per_epoch: int = 8

    def __post_init__(self):  # lists (from JSON, say) become tuples: hashable
        for name, kind in (
            ("batches", int),
            ("milestones", float),
            ("widths", int),
            ("adascale_batches", int),
            ("target_errors", float),
        ):
            object.__setattr__(self, name, tuple(map(kind, getattr(self, name))))

    @property
    def reference(self) -> str:
        """The reference row: the fixed batch n."""
        return f"fixed-{self.small_batch}"

    def configs(self) -> list[str]:
        """Fixed batches, then Smith et al., the ramp, the noise-driven batch and
        AdaScale at each of its batches."""
        return [
            *(f"fixed-{b}" for b in self.batches),
            "smith",
            "ramp",
            "noise",
            *(f"adascale-{b}" for b in self.adascale_batches),
        ]

    # --- the schedules --------------------------------------------------------------

    def samples_schedule(self, n_train: int) -> optax.Schedule:
        """The reference's rate at batch n, counted in samples: η, ×0.1 at each
        milestone (an epoch is ``n_train`` samples)."""
        return ow.step_decay_schedule(
            self.lr, [m * n_train for m in self.milestones], 0.1
        )

    def smith_steps(self) -> list[tuple[int, float]]:
        """Smith et al.'s (batch, rate) after 0, 1, 2, ... milestones.

        At each ×0.1 decay of the reference the batch grows ×``smith_factor`` up to
        ``smith_max_batch``; the rate takes the rest of the factor, so the rate
        over the batch falls ×0.1 each time.

        >>> Settings().smith_steps()
        [(32, 0.1), (256, 0.08), (1024, 0.032), (1024, 0.0032)]
        """
        batch, rate = self.small_batch, self.lr
        out = [(batch, rate)]
        for _ in self.milestones:
            grown = min(batch * self.smith_factor, max(self.smith_max_batch, batch))
            rate *= 0.1 * grown / batch
            batch = grown
            out.append((batch, float(f"{rate:.12g}")))
        return out

    def batch_schedule(self, config: str, n_train: int) -> Any:
        """The batch of ``config`` as ``ow.accumulate`` takes it: an int, or a
        schedule of the samples consumed (the noise-driven batch starts at 2n)."""
        kind = kind_of(config)
        if kind in ("fixed", "adascale"):
            return batch_of(config)
        if kind == "smith":
            steps = self.smith_steps()
            bounds = [0] + [round(m * n_train) for m in self.milestones]
            return ow.step_batch_size(
                dict(zip(bounds, [b for b, _ in steps], strict=True))
            )
        if kind == "ramp":
            n = self.small_batch
            return ow.rampup_batch_size(
                n, n, round(self.ramp_epochs * n_train), self.ramp_batch
            )
        return 2 * self.small_batch  # noise

    def recipe(self, config: str, n_train: int) -> optax.GradientTransformation:
        """The optimizer of one update (inside ``accumulate``)."""
        kind, n = kind_of(config), self.small_batch
        sgd: dict[str, Any] = {
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
        }
        if kind == "fixed":
            batch = batch_of(config)
            assert batch is not None
            return ow.sgd(
                ow.goyal_schedule(
                    batch_size=batch,
                    steps_per_epoch=n_train // batch,
                    base_lr=self.lr,
                    base_batch_size=n,
                    warmup_epochs=self.warmup_epochs,
                    milestones=self.milestones,
                    warmup="gradual",
                ),
                **sgd,
            )
        if kind == "adascale":
            reference = ow.step_decay_schedule(
                self.lr, [round(m * n_train / n) for m in self.milestones], 0.1
            )
            return ow.adascale(ow.sgd, reference_batch_size=n)(
                learning_rate=reference, **sgd
            )
        if kind == "smith":
            steps = self.smith_steps()
            rates = [r for _, r in steps]
            factors = [b / a for a, b in itertools.pairwise(rates)]
            schedule = ow.step_decay_schedule(
                self.lr, [m * n_train for m in self.milestones], factors
            )
            return ow.sgd(ow.batch_scaled_rate(schedule, rule="none"), **sgd)
        rate = ow.batch_scaled_rate(
            self.samples_schedule(n_train), base_batch_size=n, rule="linear"
        )
        return ow.sgd(rate, **sgd)  # ramp, noise

    def optimizer(self, config: str, n_train: int) -> optax.GradientTransformation:
        """``ow.accumulate`` over micro-batches of n around the trackers and the
        recipe: ``track_noise_scale(decay=0)`` (each update's estimates, summed per
        stretch of the curve) and, for the noise-driven batch, its controller's
        average (``noise_decay``)."""
        parts = [ow.track_noise_scale(decay=0.0)]
        if kind_of(config) == "noise":
            parts.append(ow.track_noise_scale(decay=self.noise_decay))
        parts.append(self.recipe(config, n_train))
        return ow.accumulate(
            optax.chain(*parts),
            batch_size=self.batch_schedule(config, n_train),
            micro_batch_size=self.small_batch,
        )

    def model(self, seed: int) -> nnx.Module:
        """The zero-γ ``SmallResNet1D`` with ghost BatchNorm over groups of n."""
        return small_resnet(self.widths, self.small_batch, seed)


def noise_batch(
    b_simple: jax.Array, batch: jax.Array, small: int, largest: int
) -> jax.Array:
    """The noise-driven batch: small·2^j nearest ``b_simple`` in [2·small,
    ``largest``]; ``batch`` (kept) where ``b_simple`` is not finite or not > 0.

    >>> [int(noise_batch(jnp.float32(b), jnp.int32(64), 32, 1024))
    ...  for b in (1.0, 100.0, 190.0, 1e9, -5.0, float("nan"))]
    [64, 128, 256, 1024, 64, 64]
    """
    ok = jnp.isfinite(b_simple) & (b_simple > 0)
    j = jnp.round(jnp.log2(jnp.where(ok, b_simple, small) / small))
    chosen = jnp.clip(small * 2.0**j, 2 * small, largest).astype(jnp.int32)
    return jnp.where(ok, chosen, batch).astype(jnp.int32)


class _NoiseController:
    """The noise-driven batch from the controller's tracker (a picklable callable)."""

    def __init__(self, small: int, largest: int):
        self.small, self.largest = small, largest

    def __call__(self, opt_state: Any) -> jax.Array:
        average = opt_state.inner_state[1]  # chain(raw, average, recipe)
        b_simple = average.trace_sigma / average.g2
        return noise_batch(b_simple, opt_state.batch_size, self.small, self.largest)


def _raw_g2(state: Any) -> jax.Array:
    return state.inner_state[0].g2


def _raw_trace(state: Any) -> jax.Array:
    return state.inner_state[0].trace_sigma


def _average_b_simple(state: Any) -> jax.Array:
    average = state.inner_state[1]
    return average.trace_sigma / average.g2


class _TauProgress:
    """AdaScale's progress in epochs of the reference: τ / (N / n)."""

    def __init__(self, small: int):
        self.small = small

    def __call__(self, reads: Mapping[str, float], n_train: int) -> float:
        return reads["tau"] * self.small / n_train


def train_run(
    settings: Settings,
    config: str,
    seed: int,
    data: Arrays,
    *,
    mesh: Mesh | None = None,
    on_epoch: OnEpoch | None = None,
) -> Result:
    """Trains one (configuration, seed); returns what it was, its totals, final
    errors, its curve (every 1/8 epoch) and its per-epoch lists."""
    n_train = len(data["y_train"])
    kind, n = kind_of(config), settings.small_batch
    reads: dict[str, Any] = {
        "lr": ow.current_lr,
        "g2": _raw_g2,
        "trace_sigma": _raw_trace,
    }
    controller = None
    progress: Any = examples_progress
    if kind == "noise":
        reads["b_simple_average"] = _average_b_simple
        controller = _NoiseController(n, settings.noise_max_batch)
    if kind == "adascale":
        reads.update(gain=ow.current_gain, tau=ow.adascale_progress)
        progress = _TauProgress(n)
    out = train_accumulated(
        settings.model(seed),
        settings.optimizer(config, n_train),
        data,
        micro_batch_size=n,
        epochs=settings.epochs,
        seed=seed,
        label_smoothing=settings.label_smoothing,
        controller=controller,
        progress=progress,
        evals_per_epoch=settings.evals_per_epoch,
        reads=reads,
        sums=("g2", "trace_sigma"),
        mesh=mesh,
        on_epoch=on_epoch,
        step_key=(settings, config, n_train),
    )
    curve = out.pop("curve")
    for name in ("g2", "trace_sigma"):  # the last update's: their sums are kept
        del curve[name]
    return {
        "config": config,
        "kind": kind,
        "seed": seed,
        "steps": out.pop("updates"),
        "examples": out.pop("examples"),
        "diverged": out.pop("diverged"),
        "final_test_error": stats.final_error(out["test_error"]),
        "last_test_error": out["test_error"][-1],
        "train_examples": n_train,
        "seconds": out.pop("seconds"),
        "curve": {k: [_round(v) for v in vs] for k, vs in curve.items()},
        **out,
    }


def _round(value: Any) -> Any:
    """Six significant digits for the JSON (None and ints kept)."""
    if value is None or isinstance(value, int):
        return value
    value = float(value)
    return float(f"{value:.6g}") if math.isfinite(value) else None


# --- the command line -------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe's flags, then the schedules' and the targets."""
    d = Settings()
    parser.set_defaults(samples=DEFAULT_SAMPLES, seeds=DEFAULT_SEEDS)
    flags.add_recipe_arguments(parser, d)
    a = parser.add_argument_group("the adaptive-batch experiment").add_argument
    a(
        "--batches",
        type=flags.ints,
        default=flags.shown(d.batches),
        help="comma-separated fixed batches kn, multiples of n, n (the reference) "
        "among them",
    )
    a(
        "--smith-factor",
        type=int,
        default=d.smith_factor,
        help="Smith et al.: the batch grows by this factor at each ×0.1 decay",
    )
    a(
        "--smith-max-batch",
        type=int,
        default=d.smith_max_batch,
        help="Smith et al.: the largest batch (the rest of each decay is a rate decay)",
    )
    a("--ramp-batch", type=int, default=d.ramp_batch, help="the ramp's final batch")
    a(
        "--ramp-epochs",
        type=float,
        default=d.ramp_epochs,
        help="epochs of examples over which the ramp grows from n",
    )
    a(
        "--noise-max-batch",
        type=int,
        default=d.noise_max_batch,
        help="the largest noise-driven batch (n·2^j)",
    )
    a(
        "--noise-decay",
        type=float,
        default=d.noise_decay,
        help="the decay per update of the B_simple average the noise-driven batch "
        "follows",
    )
    a(
        "--adascale-batches",
        type=flags.ints,
        default=flags.shown(d.adascale_batches),
        help="comma-separated batches of the AdaScale runs, multiples of n above n",
    )
    a(
        "--target-errors",
        type=flags.floats,
        default=flags.shown([100 * t for t in d.target_errors]),
        help="comma-separated test errors (%%) of McCandlish et al.'s fit, besides "
        "the reference's final error",
    )
    a(
        "--evals-per-epoch",
        type=int,
        default=d.evals_per_epoch,
        help="evaluations of the test set per epoch of examples (the curve)",
    )


def _multiples(flag: str, values: Sequence[int], n: int, low: int) -> None:
    bad = [b for b in values if b < low or b % n]
    if bad:
        raise FlagError(
            flag,
            f"{flags.shown(bad)}: must be multiples of --small-batch {n}, >= {low}",
        )


def from_flags(args: argparse.Namespace) -> Settings:
    """The settings of the parsed flags; ``FlagError`` for a value that cannot
    work."""
    milestones = flags.check_recipe_arguments(args)
    n = args.small_batch
    _multiples("--batches", args.batches, n, n)
    if list(args.batches) != sorted(set(args.batches)) or n not in args.batches:
        raise FlagError(
            "--batches",
            f"{flags.shown(args.batches)} must be strictly increasing and include "
            f"the reference batch --small-batch {n}",
        )
    if len(args.batches) < 3:
        raise FlagError(
            "--batches", "needs at least 3 fixed batches (the trade-off's fit)"
        )
    _multiples("--adascale-batches", args.adascale_batches, n, 2 * n)
    if not args.adascale_batches:
        raise FlagError("--adascale-batches", "needs at least one batch")
    _multiples("--smith-max-batch", [args.smith_max_batch], n, n)
    _multiples("--ramp-batch", [args.ramp_batch], n, 2 * n)
    if args.smith_factor < 2:
        raise FlagError(
            "--smith-factor", f"must be an integer >= 2, got {args.smith_factor}"
        )
    j = math.log2(max(args.noise_max_batch, 1) / n)
    if args.noise_max_batch % n or j < 1 or j != int(j):
        raise FlagError(
            "--noise-max-batch",
            f"{args.noise_max_batch}: must be n·2^j with j >= 1 (n = --small-batch "
            f"{n})",
        )
    if not 0 < args.ramp_epochs < args.epochs:
        raise FlagError(
            "--ramp-epochs",
            f"must be in (0, --epochs {args.epochs}), got {args.ramp_epochs:g}",
        )
    if not 0 <= args.noise_decay < 1:
        raise FlagError("--noise-decay", f"must be in [0, 1), got {args.noise_decay:g}")
    if not args.target_errors or not all(0 < t < 100 for t in args.target_errors):
        raise FlagError(
            "--target-errors",
            f"must be percentages in (0, 100), got {flags.shown(args.target_errors)}",
        )
    flags.check_at_least_one(args, "evals_per_epoch")
    return Settings(
        **{
            **flags.settings_fields(args, Settings),
            "milestones": milestones,
            "target_errors": tuple(t / 100 for t in args.target_errors),
        }
    )


_FLAG_OF = {"learning_rate": "--lr"}


def check(settings: Settings, data: Arrays, devices: int) -> None:
    """``FlagError`` unless every run can train on ``data`` over ``devices``."""
    n_train = len(data["y_train"])
    flags.check_batches(
        {
            "--batches": settings.batches,
            "--adascale-batches": settings.adascale_batches,
            "--smith-max-batch": [settings.smith_max_batch],
            "--ramp-batch": [settings.ramp_batch],
            "--noise-max-batch": [settings.noise_max_batch],
        },
        settings.small_batch,
        n_train,
        devices,
    )
    for batch in settings.batches:  # their schedules count whole epochs of updates
        if n_train % batch:
            raise FlagError(
                "--batches",
                f"{batch} does not divide the {n_train} training sequences: a fixed "
                "batch's warmup and decays are counted in updates of whole epochs",
            )
    for config in settings.configs():
        with flags.library_checks(_FLAG_OF):
            settings.optimizer(config, n_train)


# --- the analysis -------------------------------------------------------------------


def _to_target(run: Result, target: float) -> tuple[float | None, float | None]:
    """(steps, examples) where the run's curve first reaches ``target``."""
    curve = run["curve"]
    errors = [np.nan if e is None else e for e in curve["test_error"]]
    steps = stats.count_to_target(curve["updates"], errors, target)
    examples = stats.count_to_target(curve["examples"], errors, target)
    return steps, examples


def stretch_noise_scale(run: Result, target: float | None = None) -> float | None:
    """B_simple averaged from the start to where the curve first reaches
    ``target`` (the whole run for None): ``Σ tr Σ / Σ |G|²`` over its updates."""
    curve = run["curve"]
    end = len(curve["test_error"])
    if target is not None:
        reached = [i for i, e in enumerate(curve["test_error"]) if e is not None]
        reached = [i for i in reached if curve["test_error"][i] <= target]
        if not reached:
            return None
        end = reached[0] + 1
    g2 = float(np.nansum(np.asarray(curve["g2_sum"][:end], np.float64)))
    trace = float(np.nansum(np.asarray(curve["trace_sigma_sum"][:end], np.float64)))
    return stats.noise_scale_of_sums(trace, g2)


def _median(values: Sequence[float | None]) -> float | None:
    """The median over seeds, a run that never got there counting as infinite:
    None when most did not."""
    array = np.asarray([np.inf if v is None else v for v in values], np.float64)
    median = float(np.median(array))
    return median if math.isfinite(median) else None


def critical_batch(
    results: Sequence[Result], settings: Settings, target: float
) -> dict[str, Any]:
    """McCandlish et al.'s fit over the fixed-batch runs that reach ``target``,
    pooled and per seed, and B_simple over the same stretch of those runs
    (``stats.critical_batch_vs_noise_scale``)."""
    fixed = [r for r in results if r["kind"] == "fixed" and not r["diverged"]]
    points: dict[int, list[tuple[float, float]]] = {}
    scales: dict[int, list[float | None]] = {}
    for run in fixed:
        steps, examples = _to_target(run, target)
        if steps is not None and examples is not None:
            points.setdefault(run["seed"], []).append((steps, examples))
        if batch_of(run["config"]) != settings.small_batch:
            scales.setdefault(run["seed"], []).append(stretch_noise_scale(run, target))
    return {"target": target, **stats.critical_batch_vs_noise_scale(points, scales)}


def summarize(results: Sequence[Result], settings: Settings) -> Summary:
    """``{"rows": per configuration, "analysis": fits, targets, best fixed}``."""
    by_config = {
        c: [r for r in results if r["config"] == c] for c in settings.configs()
    }
    by_config = {c: runs for c, runs in by_config.items() if runs}
    reference = by_config.get(settings.reference, [])
    ref_errors = [r["final_test_error"] for r in reference]
    ref_target = stats.mean_std(ref_errors)[0] if ref_errors else None
    rows: dict[str, dict[str, Any]] = {}
    for config, runs in by_config.items():
        errors = [r["final_test_error"] for r in runs]
        mean, std = stats.mean_std(errors)
        row: dict[str, Any] = {
            "kind": kind_of(config),
            "is_reference": config == settings.reference,
            "test_error_mean": mean,
            "test_error_std": std,
            "test_errors": errors,
            "diverged_runs": sum(r["diverged"] for r in runs),
            "steps": float(np.mean([r["steps"] for r in runs])),
            "examples": float(np.mean([r["examples"] for r in runs])),
            "batch_range": _batch_range(runs),
            "b_simple": _median([stretch_noise_scale(r) for r in runs]),
        }
        if ref_errors:
            row.update(stats.versus_reference(errors, ref_errors))
            if row["is_reference"]:
                row["p_value"] = None
        if ref_target is not None:
            pairs = [_to_target(r, ref_target) for r in runs]
            row["steps_to_reference"] = _median([s for s, _ in pairs])
            row["examples_to_reference"] = _median([e for _, e in pairs])
            row["per_seed_to_reference"] = pairs
        rows[config] = row
    best = _best_fixed(rows)
    for row in rows.values():
        row["steps_ratio"] = row["examples_ratio"] = None
        steps, examples = (
            row.get("steps_to_reference"),
            row.get("examples_to_reference"),
        )
        if best is not None and steps is not None and examples is not None:
            row["steps_ratio"] = steps / rows[best]["steps_to_reference"]
            row["examples_ratio"] = examples / rows[best]["examples_to_reference"]
    targets = list(settings.target_errors)
    if ref_target is not None:
        targets.append(ref_target)
    for config, runs in by_config.items():  # steps and examples to every target
        counts = [[_to_target(r, t) for r in runs] for t in targets]
        rows[config]["to_targets"] = [
            [t, _median([s for s, _ in c]), _median([e for _, e in c])]
            for t, c in zip(targets, counts, strict=True)
        ]
    analysis = {
        "reference_error": ref_target,
        "best_fixed": best,
        "critical_batch": [critical_batch(results, settings, t) for t in targets],
    }
    return {"rows": rows, "analysis": analysis}


def _batch_range(runs: Sequence[Result]) -> list[float]:
    batches = [b for r in runs for b in r["curve"]["batch"] if b is not None]
    return [min(batches), max(batches)] if batches else []


def _best_fixed(rows: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The fixed batch with the fewest steps to the reference's final error."""
    reached = [
        (row["steps_to_reference"], config)
        for config, row in rows.items()
        if row["kind"] == "fixed" and row.get("steps_to_reference") is not None
    ]
    return min(reached)[1] if reached else None


# --- the report ---------------------------------------------------------------------


def label(config: str) -> str:
    """``fixed kn=256``, ``AdaScale kn=1024``, ``Smith et al.``."""
    kind, batch = kind_of(config), batch_of(config)
    if kind == "fixed":
        return f"fixed kn={batch}"
    if kind == "adascale":
        return f"AdaScale kn={batch}"
    return LABELS[kind]


def _count(value: float | None) -> str:
    return "not reached" if value is None else f"{value:,.0f}"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _num(value: float | None, digits: str = ".0f") -> str:
    return "–" if value is None else format(value, digits)


def markdown_table(summary: Summary) -> str:
    """The headline table, then the critical batch per target."""
    a = summary["analysis"]
    header = [
        "schedule",
        "batch",
        "test error (%)",
        "Δ vs reference (pp)",
        "p",
        "steps",
        "examples",
        "steps to ref. error",
        "examples to ref. error",
        "steps ratio",
        "examples ratio",
    ]
    rows = []
    for config, row in summary["rows"].items():
        diverged = f" ({row['diverged_runs']} diverged)" if row["diverged_runs"] else ""
        lo_hi = row["batch_range"]
        batch = (
            "–"
            if not lo_hi
            else f"{lo_hi[0]:.0f}"
            if lo_hi[0] == lo_hi[1]
            else f"{lo_hi[0]:.0f}–{lo_hi[1]:.0f}"
        )
        gap = (
            "–"
            if row["is_reference"] or "gap_vs_reference" not in row
            else report.gap_cell(row["gap_vs_reference"], row["gap_standard_error"])
        )
        best = " (best fixed)" if config == a["best_fixed"] else ""
        rows.append(
            [
                label(config) + best + diverged,
                batch,
                report.percent_pm(row["test_error_mean"], row["test_error_std"]),
                gap,
                report.p_cell(row.get("p_value")),
                f"{row['steps']:,.0f}",
                f"{row['examples']:,.0f}",
                _count(row.get("steps_to_reference")),
                _count(row.get("examples_to_reference")),
                _ratio(row["steps_ratio"]),
                _ratio(row["examples_ratio"]),
            ]
        )
    fits = [
        [
            f"{100 * c['target']:.2f}",
            ",".join(map(str, c["batches_reached"])) or "none",
            _num(c.get("s_min")),
            _num(c.get("e_min")),
            _num(c.get("b_crit")),
            _num(c.get("rms_log_error"), ".3f"),
            _num(c["b_simple"])
            + ("" if c["b_simple"] is None else f" ± {c['b_simple_std']:.0f}"),
            "–"
            if c["ratio_mean"] is None
            else f"{c['ratio_mean']:.2f} ± {c['ratio_std']:.2f}",
        ]
        for c in a["critical_batch"]
    ]
    fit_header = [
        "target error (%)",
        "fixed batches that reach it",
        "S_min",
        "E_min",
        "B_crit",
        "rms log misfit",
        "B_simple (same stretch)",
        "B_simple / B_crit",
    ]
    targets = [t for t, _, _ in next(iter(summary["rows"].values()))["to_targets"]]
    reach_header = ["schedule"] + [
        f"steps / examples to {100 * t:.2f}%" for t in targets
    ]
    reach = [
        [label(config)]
        + [
            "not reached" if s is None or e is None else f"{s:,.0f} / {e:,.0f}"
            for _, s, e in row["to_targets"]
        ]
        for config, row in summary["rows"].items()
    ]
    return "\n".join(
        report.markdown_table(h, r)
        for h, r in ((header, rows), (fit_header, fits), (reach_header, reach))
    )


def notes(summary: Summary) -> list[str]:
    """What the columns mean, then the headline in words."""
    a = summary["analysis"]
    rows = summary["rows"]
    p_values = [r.get("p_value") for r in rows.values() if not r["is_reference"]]
    ref = a["reference_error"]
    ref_cell = _num(None if ref is None else 100 * ref, ".2f")
    lines = [
        report.p_value_note(p_values),
        "steps, examples: per run, mean over seeds; to ref. error: where the test "
        "error (evaluated every 1/8 epoch of examples, linearly interpolated) first "
        f"reaches the reference's mean final error ({ref_cell}%),"
        " median over seeds; ratios: to the best fixed batch (fewest steps)",
        "B_crit: McCandlish et al.'s fit (S/S_min − 1)(E/E_min − 1) = 1 over the "
        "fixed batches (every seed's point); B_simple: Σ tr Σ / Σ |G|² over the "
        "same runs up to the target, mean ± std over seeds; ratio: per seed",
    ]
    reached = [
        str(batch_of(c))
        for c, row in rows.items()
        if row["kind"] == "fixed" and row.get("steps_to_reference") is not None
    ]
    lines.append(
        "fixed batches that reach the reference's final error: "
        + (", ".join(reached) or "none")
    )
    best = a["best_fixed"]
    if best is None:
        lines.append("no fixed batch reached the reference's final error")
    else:
        lines.append(
            f"best fixed batch: {label(best)}, "
            f"{rows[best]['steps_to_reference']:,.0f} steps"
        )
        for config, row in rows.items():
            if row["kind"] == "fixed":
                continue
            if row["steps_ratio"] is None:
                lines.append(f"{label(config)}: did not reach the reference's error")
            else:
                lines.append(
                    f"{label(config)}: {row['steps_ratio']:.2f}× the steps, "
                    f"{row['examples_ratio']:.2f}× the examples of {label(best)}"
                )
    return lines


KIND_MARKERS = {"smith": "s", "ramp": "^", "noise": "D", "adascale": "P"}


def plot(results: Sequence[Result], settings: Settings, out: Path) -> list[Path]:
    """Writes steps_vs_examples.png, schedules.png and test_error.png."""
    summary = summarize(results, settings)
    fits = summary["analysis"]["critical_batch"]
    paths = [
        out / "steps_vs_examples.png",
        out / "schedules.png",
        out / "test_error.png",
    ]
    configs = list(summary["rows"])
    palette = report.pyplot().get_cmap("tab20")  # 11 runs and more: distinct colors
    colors = {
        c: palette((2 * i) % 20 + (2 * i) // 20 % 2) for i, c in enumerate(configs)
    }

    # 1. McCandlish et al.'s trade-off per target, with every run's point.
    with report.figure(
        paths[0], 1, len(fits), figsize=(4.2 * len(fits), 4.2), squeeze=False
    ) as (_, axes):
        for ax, fit in zip(axes[0], fits, strict=True):
            for config in configs:
                pairs = [
                    _to_target(r, fit["target"])
                    for r in results
                    if r["config"] == config
                ]
                pairs = [(s, e) for s, e in pairs if s is not None and e is not None]
                if not pairs:
                    continue
                s, e = zip(*pairs, strict=True)
                kind = kind_of(config)
                ax.scatter(
                    e,
                    s,
                    color=colors[config],
                    marker=KIND_MARKERS.get(kind, "o"),
                    s=22 if kind == "fixed" else 40,
                    label=label(config),
                )
            if "b_crit" in fit:
                ax.plot(fit["examples"], fit["steps"], color="0.3", linewidth=1)
                ax.set_title(
                    f"target {100 * fit['target']:.2f}%: B_crit ≈ {fit['b_crit']:.0f}",
                    fontsize=9,
                )
            else:
                ax.set_title(f"target {100 * fit['target']:.2f}%: no fit", fontsize=9)
            ax.set(xscale="log", yscale="log", xlabel="examples E", ylabel="steps S")
        handles: dict[str, Any] = {}
        for ax in axes[0]:
            for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(name, handle)
        axes[0][0].legend(handles.values(), handles.keys(), fontsize=6)

    # 2. The batch, the rate and B_simple along the first seed's runs.
    seed = min((r["seed"] for r in results), default=0)
    firsts = {r["config"]: r for r in results if r["seed"] == seed}
    with report.figure(paths[1], 3, 1, figsize=(7.5, 9), sharex=True) as (_, axes):
        for config, run in firsts.items():
            curve = run["curve"]
            epochs = np.asarray(curve["examples"], float) / run["train_examples"]
            style: dict[str, Any] = {"color": colors[config], "label": label(config)}
            if kind_of(config) != "fixed":
                style["linewidth"] = 2
            axes[0].step(epochs, _nan(curve["batch"]), where="pre", **style)
            axes[1].plot(epochs, _nan(curve["lr"]), **style)
            g2 = _nan(curve["g2_sum"])
            trace = _nan(curve["trace_sigma_sum"])
            per_epoch = settings.evals_per_epoch
            with np.errstate(all="ignore"):
                b = _rolling(trace, per_epoch) / _rolling(g2, per_epoch)
            b[~(b > 0)] = np.nan
            if np.isfinite(b).any():
                axes[2].plot(epochs, b, **style)
        axes[0].set(yscale="log", ylabel="batch")
        axes[0].set_yscale("log", base=2)
        axes[1].set(yscale="log", ylabel="rate")
        axes[2].set(
            yscale="log",
            ylabel="B_simple (last epoch's updates)",
            xlabel="epochs of examples",
        )
        axes[0].set_title(
            f"Batch, rate and B_simple along the runs (seed {seed})", fontsize=10
        )
        axes[0].legend(fontsize=7, ncol=2)

    # 3. The test error against the steps.
    with report.figure(paths[2], figsize=(7.5, 4.5)) as (_, ax):
        for config, run in firsts.items():
            curve = run["curve"]
            ax.plot(
                curve["updates"],
                100 * _nan(curve["test_error"]),
                color=colors[config],
                label=label(config),
                linewidth=2 if kind_of(config) != "fixed" else 1,
            )
        ref = summary["analysis"]["reference_error"]
        if ref is not None:
            ax.axhline(
                100 * ref, color="0.4", linestyle="--", label="reference's error"
            )
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="optimizer steps",
            ylabel="test error (%)",
        )
        ax.set_title(
            f"Test error every 1/8 epoch of examples (seed {seed})", fontsize=10
        )
        ax.legend(fontsize=7, ncol=2)
    return paths


def _nan(values: Sequence[float | None]) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], np.float64)


def _rolling(values: np.ndarray, window: int) -> np.ndarray:
    """The sum over the last ``window`` points (fewer at the start)."""
    filled = np.nan_to_num(values)
    cumulative = np.concatenate([[0.0], np.cumsum(filled)])
    idx = np.arange(1, len(values) + 1)
    return cumulative[idx] - cumulative[np.maximum(idx - window, 0)]


EXPERIMENT = Experiment(
    name="adaptive-batch",
    description=(
        "Which schedule of the batch reaches the small batch's test error in the "
        "fewest optimizer steps, and at what cost in examples? Fixed batches "
        "(linear scaling rule and gradual warmup), Smith et al. 2017 (grow the "
        "batch instead of decaying the rate), a ramp, a batch that follows the "
        "measured noise scale and AdaScale (Johnson et al. 2020), all through one "
        "compiled micro-step (ow.accumulate), with McCandlish et al. 2018's "
        "critical batch fitted over the fixed batches."
    ),
    quick={
        "samples": 2560,
        "epochs": 3,
        "warmup_epochs": 1.0,
        "milestones": "2",
        "seeds": 1,
        "batches": "32,64,128",
        "smith_max_batch": 256,
        "ramp_batch": 256,
        "ramp_epochs": 1.0,
        "noise_max_batch": 256,
        "adascale_batches": "128",
        "target_errors": "60,40",
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
