"""The warmup experiment's report: its summary, its table and its figures.

``summarize`` turns the runs into the final test error per configuration (mean ± std
over seeds, the gap to the reference and Welch's p), ``markdown_table`` lays it out
like Goyal et al.'s Table 1, and ``plot`` draws ``training_error.png`` (the training
error per epoch of each large-batch configuration against the reference, their
Figure 2 layout) and ``lr_schedules.png`` (every configuration's learning-rate
schedule, whole and its first epochs) with matplotlib's Agg backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from optax_warmup.demo import report
from optax_warmup.demo.experiment import Result, Summary
from optax_warmup.demo.store import atomic_write
from optax_warmup.demo.warmup import CONFIGS, REFERENCE, Settings


def summarize(results: Sequence[Result], settings: Settings) -> Summary:
    """Per configuration: final test error mean ± std over seeds, and the gap.

    Each configuration's final errors are compared with the reference's: the gap
    of the means, its standard error and Welch's two-sided p-value (None for the
    reference itself and with a single seed).
    """
    summary: Summary = {}
    for name, config in CONFIGS.items():
        runs = [r for r in results if r["config"] == name]
        if not runs:
            continue
        errors = [r["final_test_error"] for r in runs]
        mean, std = report.mean_std(errors)
        train_mean, train_std = report.mean_std([r["final_train_error"] for r in runs])
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
            s.update(report.versus_reference(s["test_errors"], reference))
            if name == REFERENCE:
                s["p_value"] = None
    return summary


def markdown_table(summary: Summary) -> str:
    """Goyal's Table 1 layout: one row per configuration, errors in percent."""
    header = [
        "configuration",
        "batch",
        "peak η",
        "test error (%)",
        "Δ vs reference (pp)",
        "p vs reference",
        "train error (%)",
    ]
    rows = []
    for name, s in summary.items():
        gap = "–"
        if name != REFERENCE and "gap_vs_reference" in s:
            gap = (
                f"{100 * s['gap_vs_reference']:+.2f} ± "
                f"{100 * s['gap_standard_error']:.2f}"
            )
        diverged = f" ({s['diverged_runs']} diverged)" if s["diverged_runs"] else ""
        rows.append(
            [
                s["label"] + diverged,
                str(s["batch_size"]),
                f"{s['peak_lr']:.4g}",
                report.percent_pm(s["test_error_mean"], s["test_error_std"]),
                gap,
                report.p_cell(s.get("p_value")),
                report.percent_pm(s["train_error_mean"], s["train_error_std"]),
            ]
        )
    return report.markdown_table(header, rows)


# --- the figures -------------------------------------------------------------------

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


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


def plot(
    results: Sequence[Result], settings: Settings, n_train: int, out: Path
) -> list[Path]:
    """Writes training_error.png and lr_schedules.png into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, settings.epochs + 1)

    def curves(config: str) -> np.ndarray:
        rows = [
            r["train_error"] + [np.nan] * (settings.epochs - len(r["train_error"]))
            for r in results
            if r["config"] == config
        ]
        return 100 * np.asarray(rows, np.float64)

    large = [c for c in CONFIGS if c != REFERENCE]
    fig, axes = plt.subplots(1, len(large), figsize=(5 * len(large), 4), sharey=True)
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
        for m in (settings.warmup_epochs, *settings.milestones):
            ax.axvline(m, color="0.8", linestyle=":", zorder=0)
        ax.set(yscale="log", xlabel="epoch", title=label(config, settings))
        ax.legend(loc="upper right", fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel("training error (%): mean, min–max over seeds")
    fig.suptitle(
        "Training error per epoch (mean over the epoch's batches, training mode); "
        "dotted: end of warmup and ×0.1 decays",
        fontsize=9,
    )
    fig.tight_layout()
    paths = [out / "training_error.png", out / "lr_schedules.png"]
    _save(fig, paths[0])
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    zoom = min(settings.epochs, 2 * max(settings.warmup_epochs, 1))
    for config in CONFIGS:
        spe = n_train // settings.batch_size(config)
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
    fig.tight_layout()
    _save(fig, paths[1])
    plt.close(fig)
    return paths
