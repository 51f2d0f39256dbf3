"""Shared timing and reporting for the benchmark scripts (not part of the library).

Every script times the first (compiling) call apart, warms up, then times calls that
each end in ``block_until_ready``, so the same script gives comparable numbers on
CPU, GPU and TPU. Two things compared are timed in rounds: each round calls each
of them once, back to back, in an order that alternates from round to round, so a
slow spell of a loaded machine hits both alike. From the same rounds come the two
medians and the ratio (the median over rounds of the per-round ratio), with a 95%
bootstrap interval over rounds (fixed seed, so a result file is reproducible from
its samples). A target is "met" only when the whole interval is on its side,
"missed" when the whole interval is on the other side, and "not resolved" when the
interval contains it: the noise is then larger than the gap to the target. A control
(a step against itself) shows how wide the noise alone makes an interval.
"""

from __future__ import annotations

import json
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LEVEL = 0.95  # of the bootstrap intervals
RESAMPLES = 2000
SEED = 0  # the bootstrap's resampling, fixed: an interval is a function of the samples


def environment() -> dict[str, Any]:
    """The backend, device and library versions a result was measured with."""
    import flax
    import optax

    device = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": _cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "flax": flax.__version__,
    }


def _cpu_count() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def device_tag() -> str:
    """A file-name-safe ``<backend>-<device>`` tag, e.g. ``cpu-cpu`` or ``gpu-h100``."""
    kind = jax.devices()[0].device_kind.lower()
    safe = "".join(c if c.isalnum() else "_" for c in kind).strip("_")
    return f"{jax.default_backend()}-{safe}"


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Writes ``result`` (plus the environment) to results/<name>-<device_tag>.json."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{device_tag()}.json"
    payload = {"benchmark": name, "environment": environment(), **result}
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}")
    return path


def first_call(fn: Callable[..., Any], *args: Any, warmup: int = 3) -> float:
    """Seconds of the first (compiling) call of ``fn(*args)``; then ``warmup`` calls."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    seconds = time.perf_counter() - start
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    return seconds


def interleaved_times(
    candidates: dict[str, tuple[Callable[..., Any], tuple]],
    rounds: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds of one call of each candidate per round, in rounds that interleave them.

    Each round calls every candidate ``fn(*args)`` once, back to back, the order
    rotating by one from round to round (for two candidates: alternating), so
    that a slow spell of the machine hits the candidates of a round alike. Returns
    ``{name: [seconds of round 0, round 1, ...]}``; entry ``i`` of two candidates
    come from the same round. ``clock`` may be ``time.process_time`` (CPU time).
    """
    names = list(candidates)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            fn, args = candidates[name]
            start = clock()
            jax.block_until_ready(fn(*args))
            times[name].append(clock() - start)
    return times


def bootstrap_interval(
    samples: Sequence[float],
    statistic: Callable[..., Any] = np.median,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> list[float]:
    """The percentile bootstrap interval of ``statistic`` over ``samples``.

    ``resamples`` resamplings with replacement, from a generator of fixed ``seed``:
    the same samples always give the same interval. One sample gives ``[x, x]``.
    """
    values = np.asarray(samples, dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    estimates = statistic(values[picks], axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(estimates, [tail, 1 - tail])
    return [float(low), float(high)]


def compare(base_s: Sequence[float], s: Sequence[float]) -> dict[str, Any]:
    """``s`` against ``base_s``, two lists of seconds from the same rounds.

    Returns the number of ``rounds``; the ``ratio`` (the median over rounds of
    ``s / base_s``) and its bootstrap ``ratio_interval``; the two medians,
    ``median_s`` and ``base_median_s``, over the same rounds; the median
    ``difference_s`` and its ``difference_interval_s``.
    """
    if len(base_s) != len(s) or not s:
        raise ValueError(
            f"two equal, non-empty lists of rounds, got {len(base_s)}, {len(s)}"
        )
    ratios = [b / a for a, b in zip(base_s, s, strict=True)]
    differences = [b - a for a, b in zip(base_s, s, strict=True)]
    return {
        "rounds": len(s),
        "ratio": statistics.median(ratios),
        "ratio_interval": bootstrap_interval(ratios),
        "median_s": statistics.median(s),
        "base_median_s": statistics.median(base_s),
        "difference_s": statistics.median(differences),
        "difference_interval_s": bootstrap_interval(differences),
    }


def paired_ratio(
    base_fn: Callable[..., Any],
    base_args: tuple,
    fn: Callable[..., Any],
    args: tuple,
    pairs: int,
) -> dict[str, Any]:
    """``fn`` against ``base_fn`` over ``pairs`` back-to-back pairs of calls.

    The pairs alternate their order (``interleaved_times``); the result is
    ``compare``'s: the median ratio and its interval, and both medians from the
    same pairs (not from separate runs, whose medians a load change can move
    apart).
    """
    times = interleaved_times({"base": (base_fn, base_args), "fn": (fn, args)}, pairs)
    return compare(times["base"], times["fn"])


def verdict(interval: Sequence[float], target: float, at_least: bool = False) -> str:
    """ "met", "missed" or "not resolved": where the whole interval lies.

    For an upper bound (a ratio that must not exceed ``target``), "met" when the
    interval's upper end is under it, "missed" when its lower end is over it, and
    "not resolved" when the interval contains it. ``at_least`` for a lower bound.
    """
    low, high = interval
    if at_least:
        low, high, target = -high, -low, -target
    if high < target:
        return "met"
    if low > target:
        return "missed"
    return "not resolved"


def with_interval(value: float, interval: Sequence[float], digits: int = 3) -> str:
    """``0.988 [0.975, 1.003]``: a value and its interval, for a table cell."""
    low, high = interval
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def verdict_cell(word: str) -> str:
    """A verdict as a table shows it: a missed target in bold."""
    return "**missed**" if word == "missed" else word


def interval_note(rounds: int) -> str:
    """The line under a table that says how its ratios and verdicts are made."""
    return (
        f"Ratios: median over {rounds} interleaved pairs [{LEVEL:.0%} bootstrap "
        "interval over the pairs]; medians from the same pairs. A target is met when "
        "the whole interval is under it, missed when it is all over it, not resolved "
        "when it contains it."
    )


_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?[\w.\-]+ = ", re.M)


def hlo_ops(fn: Callable[..., Any], *args: Any) -> dict[str, int]:
    """HLO instructions before (lowered) and after XLA's optimizations (compiled)."""
    lowered = jax.jit(fn).lower(*args)
    return {
        "lowered": len(_INSTRUCTION.findall(lowered.as_text(dialect="hlo"))),
        "compiled": len(_INSTRUCTION.findall(lowered.compile().as_text())),
    }


def run_header(what: str, load_average: list[float] | None = None) -> str:
    """The line above a benchmark's tables: ``what`` it ran, the backend and device,
    the library versions and, if given, the 1-minute load before → after."""
    env = environment()
    line = (
        f"\n{what}; {env['backend']} {env['device']} x{env['device_count']}, "
        f"{env['cpu_count']} CPUs, jax {env['jax']}, optax {env['optax']}, "
        f"flax {env['flax']}"
    )
    if load_average is not None:
        line += f"; load average {load_average[0]:.1f} → {load_average[1]:.1f}"
    return line + "\n"
