"""The batch-size experiment's report: breakdown, noise scale, table and figures.

``summarize`` turns the runs into one row per configuration (final test error mean
± std over seeds, the gap to the reference with its standard error and Welch's p,
the training-average B_simple, the steps to the target error) and the analysis:

- the breakdown of each optimizer: the smallest kn > n whose mean final error
  exceeds the reference's by more than two standard errors of the gap,
  ``Δ > 2·√(s²/m + s_ref²/m_ref)`` (with one seed a side the standard error is 0
  and any excess counts); the measured critical batch is the largest batch below
  it (Goyal et al.'s stable region, which on ImageNet reaches about 8k, §2.1);
- the predicted critical batch: B_simple of the SGD runs at the smallest batch
  above n (the trajectory closest to the reference's), averaged over training as
  McCandlish et al. do: the ratio of the averages over epochs,
  ``Σ_e tr Σ_e / Σ_e |G|²_e`` (each epoch's value is the tracker's moving average,
  which spans about that epoch), then the mean over seeds;
- the steps to the target error: a run's first epoch whose test error is at or
  below the target, times its steps per epoch (so resolved to one epoch); a
  configuration's is the median over seeds (None when most seeds never get there).

``plot`` draws ``error_vs_batch.png`` (their Figure 1 with SGD and LARS, the
breakdown and the predicted critical batch), ``noise_scale.png`` (B_simple per
epoch) and ``steps_to_target.png`` (Shallue et al.'s log-log view with the
perfect-scaling line of slope −1).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from optax_warmup.demo import report
from optax_warmup.demo.batch_size import Settings, parse_config
from optax_warmup.demo.experiment import Result, Summary
from optax_warmup.demo.store import atomic_write

OPTIMIZER_LABELS = {"sgd": "SGD", "lars": "LARS"}


def training_noise_scale(run: Result) -> float | None:
    """A run's B_simple averaged over training: ``Σ tr Σ / Σ |G|²`` over epochs."""
    g2, trace = run.get("g2"), run.get("trace_sigma")
    if not g2:
        return None
    g2_sum = float(np.sum(np.asarray(g2, np.float64)))
    trace_sum = float(np.sum(np.asarray(trace, np.float64)))
    if not np.isfinite(g2_sum / trace_sum) or g2_sum <= 0:
        return None  # diverged, or |G|² never measured above the noise
    return trace_sum / g2_sum


def steps_to_target(run: Result, target: float) -> int | None:
    """Steps to the first epoch whose test error is at most ``target``, or None."""
    for epoch, error in enumerate(run["test_error"], start=1):
        if error <= target:
            return epoch * run["steps_per_epoch"]
    return None


def _median_steps(steps: Sequence[int | None]) -> float | None:
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
        mean, std = report.mean_std(errors)
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
                report.versus_reference(row["test_errors"], reference["test_errors"])
            )
            if config == settings.reference:
                row["p_value"] = None
    return {"rows": rows, "analysis": analyze(rows, settings)}


def analyze(rows: dict[str, dict[str, Any]], settings: Settings) -> dict[str, Any]:
    """The breakdown per optimizer, the predicted critical batch and their ratio."""
    analysis: dict[str, Any] = {
        "breakdown_rule": "the smallest kn > n whose mean final test error exceeds "
        "the reference's by more than 2 standard errors of the gap",
        "target_error": settings.target_error,
        "breakdown": {},
        "critical_batch": {},
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
        analysis["critical_batch"][optimizer] = max(below) if below else None
    tracked = sorted(
        (r for r in rows.values() if r["optimizer"] == "sgd" and r["noise_scale"]),
        key=lambda r: r["batch_size"],
    )
    predicted = tracked[0]["noise_scale"] if tracked else None
    analysis["predicted_critical_batch"] = predicted
    analysis["predicted_from_batch"] = tracked[0]["batch_size"] if tracked else None
    critical = analysis["critical_batch"].get("sgd")
    if predicted and critical and analysis["breakdown"].get("sgd") is not None:
        analysis["prediction_over_measured"] = predicted / critical
    else:  # no breakdown within the list: the critical batch is only a lower bound
        analysis["prediction_over_measured"] = None
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
            else f"{100 * row['gap_vs_reference']:+.2f} ± "
            f"{100 * row['gap_standard_error']:.2f}"
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
        f"{100 * a['target_error']:g}% (checked after each epoch), median over seeds",
        "breakdown: " + a["breakdown_rule"],
    ]
    for optimizer, batch in a["breakdown"].items():
        name = OPTIMIZER_LABELS[optimizer]
        critical = a["critical_batch"].get(optimizer)
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
        line = (
            f"predicted critical batch B_simple ≈ {predicted:.0f} (SGD runs at "
            f"kn={a['predicted_from_batch']})"
        )
        ratio = a.get("prediction_over_measured")
        if ratio is not None:
            line += f", {ratio:.2g}× the measured critical batch"
        lines.append(line)
    return lines


# --- the figures -------------------------------------------------------------------

COLORS = {"sgd": "C0", "lars": "C1"}
MARKERS = {"sgd": "o", "lars": "s"}


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


def _padded(values: Sequence[Any], length: int) -> list[float]:
    out = [np.nan if v is None else float(v) for v in values]
    return out + [np.nan] * (length - len(out))


def plot(results: Sequence[Result], settings: Settings, out: Path) -> list[Path]:
    """Writes error_vs_batch.png, noise_scale.png and steps_to_target.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(results, settings)
    rows, a = summary["rows"], summary["analysis"]
    paths = [
        out / "error_vs_batch.png",
        out / "noise_scale.png",
        out / "steps_to_target.png",
    ]

    # 1. Goyal's Figure 1: final test error against the batch.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for optimizer in settings.optimizers:
        mine = sorted(
            (r for r in rows.values() if r["optimizer"] == optimizer),
            key=lambda r: r["batch_size"],
        )
        if not mine:
            continue
        batches = [r["batch_size"] for r in mine]
        ax.errorbar(
            batches,
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
    predicted = a.get("predicted_critical_batch")
    if predicted is not None:
        ax.axvline(
            predicted,
            color="C2",
            linestyle="--",
            label=f"predicted critical batch B_simple ≈ {predicted:.0f}",
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
    fig.tight_layout()
    _save(fig, paths[0])
    plt.close(fig)

    # 2. B_simple per epoch along the runs.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    epochs = np.arange(1, settings.epochs + 1)
    configs = [c for c in rows if settings.tracks_noise_scale(c)]
    cmap = plt.get_cmap("viridis")
    sgd_configs = [c for c in configs if rows[c]["optimizer"] == "sgd"]
    for config in configs:
        curves = [
            _padded(r["noise_scale"], settings.epochs)
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
        ax.axhline(predicted, color="C2", linestyle=":", label="predicted (average)")
    for m in (settings.warmup_epochs, *settings.milestones):
        ax.axvline(m, color="0.85", linestyle=":", zorder=0)
    ax.set(yscale="log", xlabel="epoch", ylabel="B_simple = tr(Σ) / |G|²")
    ax.set_title(
        "Gradient noise scale along training (per epoch, mean over seeds); "
        "dotted: end of warmup, ×0.1 decays",
        fontsize=9,
    )
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, paths[1])
    plt.close(fig)

    # 3. Shallue et al.: steps to the target error against the batch.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for optimizer in settings.optimizers:
        mine = sorted(
            (
                r
                for r in rows.values()
                if r["optimizer"] == optimizer and r["steps_to_target"] is not None
            ),
            key=lambda r: r["batch_size"],
        )
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
    if predicted is not None:
        ax.axvline(predicted, color="C2", linestyle=":", label="B_simple")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="batch kn", ylabel="steps to the target")
    ax.set_title(
        f"Steps until the test error reaches {100 * settings.target_error:g}% "
        "(Shallue et al. 2019)",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, paths[2])
    plt.close(fig)
    return paths
