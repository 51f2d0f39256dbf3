"""Shared timing and reporting for the benchmark scripts (not part of the library).

Every script times the first (compiling) call apart, warms up, then times ``repeats``
calls that each end in ``block_until_ready`` and reports the median, so the same
script gives comparable numbers on CPU, GPU and TPU.
"""

from __future__ import annotations

import json
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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


def time_call(
    fn: Callable[..., Any], *args: Any, repeats: int = 20, warmup: int = 3
) -> dict[str, float]:
    """Times ``fn(*args)``: the first call (compile) apart, then the median of repeats.

    Returns seconds: ``{"first_call_s", "median_s", "min_s"}``.
    """
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return {
        "first_call_s": first,
        "median_s": statistics.median(times),
        "min_s": min(times),
    }


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


def paired_ratio(
    base_fn: Callable[..., Any],
    base_args: tuple,
    fn: Callable[..., Any],
    args: tuple,
    pairs: int,
) -> dict[str, float]:
    """Median over back-to-back pairs of (time of fn) / (time of base_fn).

    Each pair runs both calls one after the other, in alternating order, so that a
    slow spell of a loaded machine hits both sides of a pair alike; the median of
    the pair ratios is far steadier than a ratio of two separate medians.
    """
    ratios, differences = [], []
    for i in range(pairs):
        order = [(base_fn, base_args), (fn, args)]
        if i % 2:
            order.reverse()
        seconds = []
        for f, a in order:
            start = time.perf_counter()
            jax.block_until_ready(f(*a))
            seconds.append(time.perf_counter() - start)
        if i % 2:
            seconds.reverse()
        ratios.append(seconds[1] / seconds[0])
        differences.append(seconds[1] - seconds[0])
    return {
        "ratio": statistics.median(ratios),
        "difference_s": statistics.median(differences),
    }


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
