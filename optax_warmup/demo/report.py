"""What every experiment's report shares: its table cells and its figures' frame.

Tables are Markdown (``markdown_table``) with percentages and p-values written one
way (``percent_pm``, ``p_cell``). A figure is drawn inside ``figure(path)``, which
opens it on matplotlib's Agg backend (files only, no display), lays it out, writes
the PNG atomically and closes it, even when drawing fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from optax_warmup.demo.store import atomic_write

DPI = 120  # of every PNG


def percent_pm(mean: float, std: float) -> str:
    """``12.00 ± 2.00``: a mean and a spread given as fractions, in percent."""
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def gap_cell(gap: float, standard_error: float) -> str:
    """``+3.00 ± 1.15``: a gap to the reference and its standard error, in
    percentage points."""
    return f"{100 * gap:+.2f} ± {100 * standard_error:.2f}"


def p_cell(p: float | None) -> str:
    """A p-value for a table: 3 decimals, ``<0.001`` below, ``–`` when undefined.

    >>> p_cell(0.1216), p_cell(2e-5), p_cell(None)
    ('0.122', '<0.001', '–')
    """
    if p is None:
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def p_value_note(p_values: Sequence[float | None]) -> str:
    """The line under a table that says what its p column is (and when it is –)."""
    note = (
        "p: two-sided Welch t-test of each configuration's final errors (one per "
        "seed) against the reference's"
    )
    if any(p is None for p in p_values):
        note += "; – where either side has fewer than 2 seeds (undefined)"
    return note


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, the first column left-aligned and the others right.

    >>> print(markdown_table(["a", "b"], [["x", "1"]]), end="")
    | a | b |
    |---|---:|
    | x | 1 |
    """
    lines = [
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    return "\n".join(lines) + "\n"


# --- the figures' frame -------------------------------------------------------------


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def figure(path: Path, nrows: int = 1, ncols: int = 1, **kwargs: Any) -> Iterator:
    """``with figure(path, figsize=(7, 4.5)) as (fig, ax):`` draws one PNG.

    Opens ``plt.subplots(nrows, ncols, **kwargs)``; after the block, lays the
    figure out (``tight_layout``) and writes it to ``path`` at ``DPI`` with
    ``store.atomic_write``; the figure is closed either way.
    """
    plt = pyplot()
    fig, axes = plt.subplots(nrows, ncols, **kwargs)
    try:
        yield fig, axes
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    finally:
        plt.close(fig)


def mark_epochs(ax: Any, epochs: Iterable[float], grey: str = "0.8") -> None:
    """Dotted ``grey`` vertical lines behind the curves at ``epochs`` (the end of
    the warmup and the rate decays, say)."""
    for epoch in epochs:
        ax.axvline(epoch, color=grey, linestyle=":", zorder=0)


def padded(values: Sequence[float | None], length: int) -> list[float]:
    """``values`` as floats (None → NaN), padded with NaN to ``length``: the
    curve of a run that stopped early (diverged) beside whole ones.

    >>> padded([0.5, None], 3)
    [0.5, nan, nan]
    """
    out = [np.nan if v is None else float(v) for v in values]
    return out + [np.nan] * (length - len(out))
