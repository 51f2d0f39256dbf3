"""The report of the warmup experiment: its table, its figures, its anchors.

Used by ``python -m optax_warmup.demo``: ``summarize`` turns the runs of
``_warmup_experiment.run_all`` into the final test error per configuration (mean ±
std over seeds, and the gap to the reference), ``markdown_table`` lays it out like
Goyal et al.'s Table 2a, and ``plot`` draws the training-error curves (their Figure 2
layout) and the learning-rate schedules with matplotlib's Agg backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from optax_warmup._warmup_experiment import CONFIGS, Experiment, mean_std

ANCHORS = {
    "goyal_2017_table_2a": {
        "what": "ResNet-50 on ImageNet, top-1 error %, mean ± std of 5 runs",
        "reference (kn=256, η=0.1)": "23.60 ± 0.12",
        "no warmup (kn=8k, η=3.2)": "24.84 ± 0.37",
        "constant warmup (kn=8k)": "25.88 ± 0.56",
        "gradual warmup (kn=8k)": "23.74 ± 0.09",
    },
    "mnist1d_paper_cnn_test_accuracy_percent": 94,
}


def summarize(results: Sequence[dict[str, Any]], exp: Experiment) -> dict[str, Any]:
    """Per configuration: final test error mean ± std over seeds, and the gap."""
    summary: dict[str, Any] = {}
    for config, (_, warmup, row) in CONFIGS.items():
        runs = [r for r in results if r["config"] == config]
        if not runs:
            continue
        errors = [r["final_test_error"] for r in runs]
        mean, std = mean_std(errors)
        train_mean, train_std = mean_std([r["final_train_error"] for r in runs])
        summary[config] = {
            "label": row,
            "batch_size": exp.batch_size(config),
            "peak_lr": exp.lr * exp.batch_size(config) / exp.small_batch,
            "warmup": warmup,
            "test_error_mean": mean,
            "test_error_std": std,
            "test_errors": errors,
            "train_error_mean": train_mean,
            "train_error_std": train_std,
            "diverged_runs": sum(r["diverged"] for r in runs),
        }
    if "reference" in summary:
        ref = summary["reference"]
        for s in summary.values():
            n1, n2 = len(s["test_errors"]), len(ref["test_errors"])
            s["gap_vs_reference"] = s["test_error_mean"] - ref["test_error_mean"]
            s["gap_standard_error"] = float(
                np.sqrt(s["test_error_std"] ** 2 / n1 + ref["test_error_std"] ** 2 / n2)
            )
    return summary


def markdown_table(summary: dict[str, Any]) -> str:
    """Goyal's Table 2a layout: one row per configuration, errors in percent."""
    lines = [
        "| configuration | batch | peak η | test error (%) | Δ vs reference (pp) "
        "| train error (%) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for config, s in summary.items():
        gap = "–"
        if config != "reference" and "gap_vs_reference" in s:
            gap = (
                f"{100 * s['gap_vs_reference']:+.2f} ± "
                f"{100 * s['gap_standard_error']:.2f}"
            )
        diverged = f" ({s['diverged_runs']} diverged)" if s["diverged_runs"] else ""
        lines.append(
            f"| {s['label']}{diverged} | {s['batch_size']} | {s['peak_lr']:.4g} "
            f"| {100 * s['test_error_mean']:.2f} ± {100 * s['test_error_std']:.2f} "
            f"| {gap} | {100 * s['train_error_mean']:.2f} ± "
            f"{100 * s['train_error_std']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def label(config: str, exp: Experiment) -> str:
    """A legend label with the numbers, e.g. ``kn=1024, kη=1.6, gradual warmup``."""
    batch, warmup = exp.batch_size(config), CONFIGS[config][1]
    if config == "reference":
        return f"n={batch}, η={exp.lr:g} (reference)"
    peak = exp.lr * batch / exp.small_batch
    return (
        f"kn={batch}, kη={peak:g}, "
        + ("no" if warmup == "none" else warmup)
        + (" warmup")
    )


COLORS = {
    "reference": "k",
    "no_warmup": "C3",
    "constant_warmup": "C1",
    "gradual_warmup": "C0",
}


def plot(results, exp: Experiment, n_train: int, out: Path) -> list[Path]:
    """training_error.png (Goyal's Figure 2 layout) and lr_schedules.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, exp.epochs + 1)

    def curves(config: str) -> np.ndarray:
        rows = [
            r["train_error"] + [np.nan] * (exp.epochs - len(r["train_error"]))
            for r in results
            if r["config"] == config
        ]
        return 100 * np.asarray(rows, np.float64)

    large = [c for c in CONFIGS if c != "reference"]
    fig, axes = plt.subplots(1, len(large), figsize=(5 * len(large), 4), sharey=True)
    for ax, config in zip(np.atleast_1d(axes), large, strict=True):
        for name in ("reference", config):
            c = curves(name)
            if not c.size:
                continue
            mean, low, high = np.nanmean(c, 0), np.nanmin(c, 0), np.nanmax(c, 0)
            ax.plot(epochs, mean, color=COLORS[name], label=label(name, exp))
            ax.fill_between(
                epochs, low, high, color=COLORS[name], alpha=0.2, linewidth=0
            )
        for m in (exp.warmup_epochs, *exp.milestones):
            ax.axvline(m, color="0.8", linestyle=":", zorder=0)
        ax.set(yscale="log", xlabel="epoch", title=label(config, exp))
        ax.legend(loc="upper right", fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel("training error (%): mean, min–max over seeds")
    fig.suptitle(
        "Training error per epoch (mean over the epoch's batches, training mode); "
        "dotted: end of warmup and ×0.1 decays",
        fontsize=9,
    )
    fig.tight_layout()
    paths = [out / "training_error.png", out / "lr_schedules.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"no_warmup": "--", "constant_warmup": "-.", "gradual_warmup": "-"}
    zoom = min(exp.epochs, 2 * max(exp.warmup_epochs, 1))
    for config in CONFIGS:
        spe = n_train // exp.batch_size(config)
        steps = np.arange(exp.epochs * spe)
        lr = np.asarray(jax.vmap(exp.schedule(config, spe))(steps))
        style = dict(
            color=COLORS[config],
            linestyle=styles.get(config, "-"),
            drawstyle="steps-post",
        )
        axes[0].plot(steps / spe, lr, label=label(config, exp), **style)
        keep = steps / spe <= zoom
        axes[1].plot(steps[keep] / spe, lr[keep], **style)
    axes[0].set(yscale="log", xlabel="epoch", ylabel="learning rate per step")
    axes[0].set_title("ow.goyal_schedule of each run (log scale)", fontsize=10)
    axes[1].set(xlabel="epoch", ylabel="learning rate per step")
    axes[1].set_title(f"the first {zoom:g} epochs (linear scale)", fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths
