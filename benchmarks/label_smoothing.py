"""What label smoothing costs: ``ow.smoothed_cross_entropy`` against the one-hot way.

Claims, float32, jitted, forward and forward+backward (``value_and_grad``
of the mean loss with respect to the logits), at (B, K) = (4096, 32000) and
(2048, 128256):

- compiled temporary memory (``memory_analysis().temp_size_in_bytes``) at most 1/4
  of the optax one-hot path's, ``softmax_cross_entropy(z, smooth_labels(one_hot))``;
- time at most 0.7× the one-hot path's;
- time at most 1.1× the unsmoothed ``softmax_cross_entropy_with_integer_labels``;
- time over a memory-bandwidth floor measured on the same machine: a jitted copy of
  the logits (one read, one write) timed the same way gives the bandwidth; the
  forward floor is one read of the logits, forward+backward one more read and one
  write (the gradient);
- PyTorch's ``F.cross_entropy(logits, labels, label_smoothing=α)`` on the same CPU
  and shapes, as a ratio, when torch is installed (the optional ``bench`` extra).

Run ``python benchmarks/label_smoothing.py`` (``--quick`` for a smoke run on small
shapes). The candidates of one shape and mode are timed in interleaved rounds, and
the median of the rounds' medians is reported, so that a load change on a shared
machine hits them alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, time_call, write_result

import optax_warmup as ow

ALPHA = 0.1
FULL_SHAPES = [(4096, 32000), (2048, 128256)]
QUICK_SHAPES = [(256, 1000), (64, 8192)]
TARGETS = {"memory_vs_one_hot": 0.25, "time_vs_one_hot": 0.7, "time_vs_integer": 1.1}


def losses(num_classes: int) -> dict[str, Callable[[jax.Array, jax.Array], jax.Array]]:
    """The mean losses compared, each ``(logits, labels) -> scalar``."""

    def ours(z, y):
        return ow.smoothed_cross_entropy(z, y, ALPHA).mean()

    def one_hot(z, y):
        target = optax.smooth_labels(jax.nn.one_hot(y, num_classes), ALPHA)
        return optax.softmax_cross_entropy(z, target).mean()

    def integer(z, y):
        return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()

    return {"ours": ours, "one_hot": one_hot, "integer": integer}


def torch_candidates(logits: jax.Array, labels: jax.Array) -> dict[str, Callable]:
    """PyTorch's label-smoothed cross-entropy, forward and forward+backward; or {}."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return {}
    z = torch.from_numpy(np.array(logits))
    y = torch.from_numpy(np.array(labels).astype(np.int64))

    def forward():
        with torch.no_grad():
            return F.cross_entropy(z, y, label_smoothing=ALPHA)

    def forward_backward():
        x = z.detach().requires_grad_()
        loss = F.cross_entropy(x, y, label_smoothing=ALPHA)
        loss.backward()
        return loss.detach(), x.grad

    return {"forward": forward, "forward_backward": forward_backward}


def temp_bytes(fn: Callable, *args: Any) -> int:
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def cpu_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median process CPU time of ``repeats`` calls (all threads; warm)."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        jax.block_until_ready(fn())
        times.append(time.process_time() - start)
    return statistics.median(times)


def interleaved(
    candidates: dict[str, Callable[[], Any]], rounds: int, repeats: int
) -> dict[str, dict[str, float]]:
    """Times each candidate in ``rounds`` interleaved rounds; median of medians.

    Wall-clock time comes from ``_common.time_call``; the process CPU time of the
    same calls is kept beside it, as it is steadier on a machine shared with other
    work (it still counts a thread that spins while it waits).
    """
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            timing = time_call(fn, repeats=repeats, warmup=1)
            timing["cpu_s"] = cpu_time(fn, repeats)
            runs[name].append(timing)
    return {
        name: {
            "first_call_s": timings[0]["first_call_s"],
            "median_s": statistics.median(t["median_s"] for t in timings),
            "min_s": min(t["min_s"] for t in timings),
            "cpu_s": statistics.median(t["cpu_s"] for t in timings),
        }
        for name, timings in runs.items()
    }


def in_place_negation(logits: jax.Array) -> Callable[[], jax.Array]:
    """x <- -x in a donated buffer: one read and one write of the logits' bytes."""
    negate = jax.jit(lambda x: -x, donate_argnums=0)
    state = [jnp.array(logits, copy=True)]

    def step() -> jax.Array:
        state[0] = negate(state[0])
        return state[0]

    return step


def bench_shape(
    batch: int, num_classes: int, rounds: int, repeats: int
) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    logits = jnp.asarray(3 * rng.standard_normal((batch, num_classes), np.float32))
    labels = jnp.asarray(rng.integers(0, num_classes, size=batch, dtype=np.int32))
    logits_bytes = logits.size * logits.dtype.itemsize

    # The floor: an in-place copy (donated, so no fresh pages to fault in) gives
    # the bandwidth that one read plus one write of the logits' bytes reaches.
    copy = in_place_negation(logits)
    copy_time = interleaved({"copy": copy}, rounds, repeats)["copy"]
    del copy
    bandwidth = 2 * logits_bytes / copy_time["median_s"]  # bytes per second
    floors = {
        "forward": logits_bytes / bandwidth,  # one read
        "forward_backward": 3 * logits_bytes / bandwidth,  # + one read, one write
    }

    torch_fns = torch_candidates(logits, labels)
    result: dict[str, Any] = {
        "shape": [batch, num_classes],
        "dtype": "float32",
        "alpha": ALPHA,
        "logits_bytes": logits_bytes,
        "copy": copy_time,
        "bandwidth_gb_s": bandwidth / 1e9,
    }
    for mode in ("forward", "forward_backward"):
        jitted = {
            name: jax.jit(fn if mode == "forward" else jax.value_and_grad(fn))
            for name, fn in losses(num_classes).items()
        }
        memory = {name: temp_bytes(fn, logits, labels) for name, fn in jitted.items()}
        candidates = {
            name: (lambda fn=fn: fn(logits, labels)) for name, fn in jitted.items()
        }
        if torch_fns:
            candidates["torch"] = torch_fns[mode]
        times = interleaved(candidates, rounds, repeats)
        ours = times["ours"]["median_s"]
        entry = {
            "temp_bytes": memory,
            "times": times,
            "floor_s": floors[mode],
            "memory_vs_one_hot": memory["ours"] / memory["one_hot"],
            "time_vs_one_hot": ours / times["one_hot"]["median_s"],
            "time_vs_integer": ours / times["integer"]["median_s"],
            "time_vs_floor": ours / floors[mode],
            "cpu_vs_one_hot": times["ours"]["cpu_s"] / times["one_hot"]["cpu_s"],
            "cpu_vs_integer": times["ours"]["cpu_s"] / times["integer"]["cpu_s"],
        }
        if "torch" in times:
            entry["time_vs_torch"] = ours / times["torch"]["median_s"]
            entry["cpu_vs_torch"] = times["ours"]["cpu_s"] / times["torch"]["cpu_s"]
        entry["targets_met"] = {
            key: bool(entry[key] <= bound) for key, bound in TARGETS.items()
        }
        result[mode] = entry
        del jitted, candidates
    return result


def main(quick: bool = False) -> dict[str, Any]:
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    rounds, repeats = (2, 3) if quick else (3, 3)
    env = environment()
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    except ImportError:
        env["torch"] = None
        print("torch is not installed: the PyTorch comparison is skipped.")
    print(f"backend={env['backend']} device={env['device']} cpus={env['cpu_count']}")
    print(f"jax={env['jax']} optax={env['optax']} torch={env['torch']}")
    results = []
    for batch, num_classes in shapes:
        print(f"benchmarking ({batch}, {num_classes}) ...", flush=True)
        results.append(bench_shape(batch, num_classes, rounds, repeats))
    result = {
        "quick": quick,
        "rounds": rounds,
        "repeats": repeats,
        "targets": TARGETS,
        "torch": env["torch"],
        "results": results,
    }
    print_table(result)
    write_result("label_smoothing-quick" if quick else "label_smoothing", result)
    return result


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 10 else f"{ms:.2f}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}" if n < 2**20 else f"{n / 2**20:.0f}"


def print_table(result: dict[str, Any]) -> None:
    """The Markdown table for the README: medians, ratios, and temp memory."""
    print(
        "\n| (B, K) | pass | ours ms | one-hot ms | integer ms | torch ms "
        "| ours / one-hot | ours / integer | ours / floor | ours / torch "
        "| CPU-time ratios (one-hot, integer, torch) | temp MiB ours / one-hot |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for res in result["results"]:
        shape = f"({res['shape'][0]}, {res['shape'][1]})"
        for mode, label in (("forward", "fwd"), ("forward_backward", "fwd+bwd")):
            e = res[mode]
            t = {name: v["median_s"] for name, v in e["times"].items()}
            torch_ms = _ms(t["torch"]) if "torch" in t else "–"
            vs_torch = f"{e['time_vs_torch']:.2f}" if "time_vs_torch" in e else "–"
            mem = e["temp_bytes"]
            cpu = ", ".join(
                f"{e[key]:.2f}" if key in e else "–"
                for key in ("cpu_vs_one_hot", "cpu_vs_integer", "cpu_vs_torch")
            )
            print(
                f"| {shape} | {label} | {_ms(t['ours'])} | {_ms(t['one_hot'])} "
                f"| {_ms(t['integer'])} | {torch_ms} | {e['time_vs_one_hot']:.2f} "
                f"| {e['time_vs_integer']:.2f} | {e['time_vs_floor']:.1f} "
                f"| {vs_torch} | {cpu} | {_mib(mem['ours'])} / {_mib(mem['one_hot'])} |"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small shapes, for a smoke run"
    )
    main(quick=parser.parse_args().quick)
