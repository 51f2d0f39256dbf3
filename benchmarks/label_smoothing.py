"""What label smoothing costs: ``ow.smoothed_cross_entropy`` against the one-hot way.

Claims, jitted, forward and forward+backward (``value_and_grad`` of the mean loss
with respect to the logits), at (B, K) = (4096, 32000) and (2048, 128256), float32
logits (and bfloat16 logits on an accelerator; on CPU bfloat16 runs in ``--quick``
only, at the small shapes):

- compiled temporary memory (``memory_analysis().temp_size_in_bytes``) at most 1/4
  of the optax one-hot path's, ``softmax_cross_entropy(z, smooth_labels(one_hot))``;
- time at most 0.7× the one-hot path's on CPU, 0.5× on an accelerator;
- time at most 1.1× the unsmoothed ``softmax_cross_entropy_with_integer_labels`` on
  CPU, 1.05× on an accelerator;
- time over a memory-bandwidth floor measured on the same machine: the faster of a
  jitted device-to-device copy of the logits and an in-place negation (one read,
  one write each) timed the same way gives the copy bandwidth; the forward floor is
  one read of the logits, forward+backward one more read and one write (the
  gradient). On an accelerator the target is at least 60% of that bandwidth
  (``bandwidth_fraction`` = floor / time);
- the forward pass against what it must do: ``logsumexp`` of the logits alone, and
  one more read of them (a row sum), timed beside the losses, so that a gap to the
  unsmoothed loss can be laid to that one extra read, or not;
- PyTorch's ``F.cross_entropy(logits, labels, label_smoothing=α)`` on the same CPU
  and shapes, as a ratio, when torch is installed (the optional ``bench`` extra).

Run ``python benchmarks/label_smoothing.py`` (``--quick`` for a smoke run on small
shapes). The candidates of one shape and mode are timed in interleaved rounds, and
the median of the rounds' medians is reported, so that a load change on a shared
machine hits them alike. On an accelerator each timed call is ``CALLS`` calls
dispatched back to back and waited for once, so that dispatch does not count.
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
# Upper bounds (ratios), and lower bounds under "at_least".
CPU_TARGETS = {
    "memory_vs_one_hot": 0.25,
    "time_vs_one_hot": 0.7,
    "time_vs_integer": 1.1,
}
ACCELERATOR_TARGETS = {
    "memory_vs_one_hot": 0.25,
    "time_vs_one_hot": 0.5,
    "time_vs_integer": 1.05,
}
ACCELERATOR_AT_LEAST = {"bandwidth_fraction": 0.6}
CALLS = 20  # calls per timed call on an accelerator


def plan(quick: bool, backend: str) -> dict[str, Any]:
    """Shapes, dtypes, calls per timing and targets for this run and backend."""
    cpu = backend == "cpu"
    return {
        "shapes": QUICK_SHAPES if quick else FULL_SHAPES,
        # bfloat16 at the full shapes doubles a CPU run for a dtype CPUs do not
        # compute in natively; --quick still runs it, at the small shapes.
        "dtypes": ["float32"] if cpu and not quick else ["float32", "bfloat16"],
        "calls": 1 if cpu else CALLS,
        "targets": CPU_TARGETS if cpu else ACCELERATOR_TARGETS,
        "at_least": {} if cpu else ACCELERATOR_AT_LEAST,
    }


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


def forward_floors() -> dict[str, Callable[[jax.Array, jax.Array], jax.Array]]:
    """What the forward pass cannot avoid: logsumexp, and one more read (a row sum)."""

    def logsumexp(z, y):
        del y
        return jax.nn.logsumexp(z.astype(jnp.float32), axis=-1).mean()

    def row_sum(z, y):
        del y
        return jnp.sum(z.astype(jnp.float32), axis=-1).mean()

    return {"floor_logsumexp": logsumexp, "floor_row_sum": row_sum}


def torch_candidates(logits: jax.Array, labels: jax.Array) -> dict[str, Callable]:
    """PyTorch's label-smoothed cross-entropy, forward and forward+backward; or {}."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return {}
    on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[str(logits.dtype)]
    z = torch.from_numpy(np.asarray(logits, np.float32)).to(device, dtype)
    y = torch.from_numpy(np.array(labels).astype(np.int64)).to(device)

    def synchronize() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    def forward():
        with torch.no_grad():
            loss = F.cross_entropy(z, y, label_smoothing=ALPHA)
        synchronize()
        return loss

    def forward_backward():
        x = z.detach().requires_grad_()
        loss = F.cross_entropy(x, y, label_smoothing=ALPHA)
        loss.backward()
        synchronize()
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


def back_to_back(fn: Callable[[], Any], calls: int) -> Callable[[], Any]:
    """``calls`` calls of ``fn`` dispatched back to back; returns the last result."""
    if calls == 1:
        return fn

    def run() -> Any:
        result = None
        for _ in range(calls):
            result = fn()
        return result

    return run


def interleaved(
    candidates: dict[str, Callable[[], Any]],
    rounds: int,
    repeats: int,
    calls: int = 1,
    cpu: bool = True,
) -> dict[str, dict[str, float]]:
    """Times each candidate in ``rounds`` interleaved rounds; median of medians.

    Wall-clock time comes from ``_common.time_call``, per call of the candidate
    (each timed call runs it ``calls`` times back to back). On CPU the process CPU
    time of the same calls is kept beside it (``cpu``), as it is steadier on a
    machine shared with other work (it still counts a thread that spins while it
    waits).
    """
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            timed = back_to_back(fn, calls)
            timing = time_call(timed, repeats=repeats, warmup=1)
            timing["median_s"] /= calls
            timing["min_s"] /= calls
            if cpu:
                timing["cpu_s"] = cpu_time(timed, repeats) / calls
            runs[name].append(timing)
    result = {}
    for name, timings in runs.items():
        result[name] = {
            "first_call_s": timings[0]["first_call_s"],
            "median_s": statistics.median(t["median_s"] for t in timings),
            "min_s": min(t["min_s"] for t in timings),
        }
        if cpu:
            result[name]["cpu_s"] = statistics.median(t["cpu_s"] for t in timings)
    return result


def in_place_negation(logits: jax.Array) -> Callable[[], jax.Array]:
    """x <- -x in a donated buffer: one read and one write of the logits' bytes."""
    negate = jax.jit(lambda x: -x, donate_argnums=0)
    state = [jnp.array(logits, copy=True)]

    def step() -> jax.Array:
        state[0] = negate(state[0])
        return state[0]

    return step


def device_copy(logits: jax.Array) -> Callable[[], jax.Array]:
    """A jitted copy of the logits into a fresh buffer (device to device)."""
    copy = jax.jit(jnp.copy)
    return lambda: copy(logits)


def bench_shape(
    batch: int, num_classes: int, dtype: str, rounds: int, repeats: int, run: dict
) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    logits32 = 3 * rng.standard_normal((batch, num_classes), np.float32)
    logits = jnp.asarray(logits32, dtype)
    del logits32
    labels = jnp.asarray(rng.integers(0, num_classes, size=batch, dtype=np.int32))
    logits_bytes = logits.size * logits.dtype.itemsize
    timing = dict(rounds=rounds, repeats=repeats, calls=run["calls"], cpu=run["cpu"])

    # The floor: the copy bandwidth, one read plus one write of the logits' bytes,
    # from the faster of a device-to-device copy and an in-place negation (donated,
    # so that a CPU does not fault in fresh pages on every call).
    copies = interleaved(
        {"device_copy": device_copy(logits), "in_place": in_place_negation(logits)},
        **timing,
    )
    copy_s = min(c["median_s"] for c in copies.values())
    bandwidth = 2 * logits_bytes / copy_s  # bytes per second
    floors = {
        "forward": logits_bytes / bandwidth,  # one read
        "forward_backward": 3 * logits_bytes / bandwidth,  # + one read, one write
    }

    torch_fns = torch_candidates(logits, labels)
    result: dict[str, Any] = {
        "shape": [batch, num_classes],
        "dtype": dtype,
        "alpha": ALPHA,
        "logits_bytes": logits_bytes,
        "copy": copies,
        "bandwidth_gb_s": bandwidth / 1e9,
    }
    for mode in ("forward", "forward_backward"):
        fns = losses(num_classes)
        if mode == "forward":
            fns.update(forward_floors())
        jitted = {
            name: jax.jit(fn if mode == "forward" else jax.value_and_grad(fn))
            for name, fn in fns.items()
        }
        memory = {
            name: temp_bytes(fn, logits, labels)
            for name, fn in jitted.items()
            if not name.startswith("floor_")
        }
        candidates = {
            name: (lambda fn=fn: fn(logits, labels)) for name, fn in jitted.items()
        }
        if torch_fns:
            candidates["torch"] = torch_fns[mode]
        times = interleaved(candidates, **timing)
        t = {name: v["median_s"] for name, v in times.items()}
        entry: dict[str, Any] = {
            "temp_bytes": memory,
            "times": times,
            "floor_s": floors[mode],
            "memory_vs_one_hot": memory["ours"] / memory["one_hot"],
            "time_vs_one_hot": t["ours"] / t["one_hot"],
            "time_vs_integer": t["ours"] / t["integer"],
            "time_vs_floor": t["ours"] / floors[mode],
            "bandwidth_fraction": floors[mode] / t["ours"],
        }
        if mode == "forward":
            # What the unsmoothed loss must do too (logsumexp), and what smoothing
            # adds at most (one more read of the logits), against its time.
            entry["logsumexp_vs_integer"] = t["floor_logsumexp"] / t["integer"]
            entry["one_read_vs_integer"] = t["floor_row_sum"] / t["integer"]
        if run["cpu"]:
            cpu = {name: v["cpu_s"] for name, v in times.items()}
            entry["cpu_vs_one_hot"] = cpu["ours"] / cpu["one_hot"]
            entry["cpu_vs_integer"] = cpu["ours"] / cpu["integer"]
            if "torch" in cpu:
                entry["cpu_vs_torch"] = cpu["ours"] / cpu["torch"]
        if "torch" in t:
            entry["time_vs_torch"] = t["ours"] / t["torch"]
        entry["targets_met"] = {
            key: bool(entry[key] <= bound) for key, bound in run["targets"].items()
        } | {key: bool(entry[key] >= bound) for key, bound in run["at_least"].items()}
        result[mode] = entry
        del jitted, candidates
    return result


def main(quick: bool = False) -> dict[str, Any]:
    rounds, repeats = (2, 3) if quick else (3, 3)
    env = environment()
    run = plan(quick, env["backend"])
    run["cpu"] = env["backend"] == "cpu"
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
    for dtype in run["dtypes"]:
        for batch, num_classes in run["shapes"]:
            print(f"benchmarking ({batch}, {num_classes}) {dtype} ...", flush=True)
            results.append(bench_shape(batch, num_classes, dtype, rounds, repeats, run))
    result = {
        "quick": quick,
        "rounds": rounds,
        "repeats": repeats,
        "calls_per_timing": run["calls"],
        "dtypes": run["dtypes"],
        "targets": run["targets"],
        "targets_at_least": run["at_least"],
        "torch": env["torch"],
        "results": results,
    }
    print_table(result)
    write_result("label_smoothing-quick" if quick else "label_smoothing", result)
    return result


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 10 else f"{ms:.2f}" if ms >= 0.1 else f"{ms:.3f}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}" if n < 2**20 else f"{n / 2**20:.0f}"


def _ratio(entry: dict[str, Any], key: str) -> str:
    return f"{entry[key]:.2f}" if key in entry else "–"


def print_table(result: dict[str, Any]) -> None:
    """The Markdown tables for the docs: medians, ratios, memory; the forward floor."""
    print(
        "\n| (B, K) | dtype | pass | ours ms | one-hot ms | integer ms | torch ms "
        "| ours / one-hot | ours / integer | % of copy bandwidth | ours / torch "
        "| CPU-time ratios (one-hot, integer, torch) | temp MiB ours / one-hot |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for res in result["results"]:
        shape = f"({res['shape'][0]}, {res['shape'][1]})"
        for mode, label in (("forward", "fwd"), ("forward_backward", "fwd+bwd")):
            e = res[mode]
            t = {name: v["median_s"] for name, v in e["times"].items()}
            torch_ms = _ms(t["torch"]) if "torch" in t else "–"
            mem = e["temp_bytes"]
            cpu = ", ".join(
                _ratio(e, key)
                for key in ("cpu_vs_one_hot", "cpu_vs_integer", "cpu_vs_torch")
            )
            print(
                f"| {shape} | {res['dtype']} | {label} | {_ms(t['ours'])} "
                f"| {_ms(t['one_hot'])} | {_ms(t['integer'])} | {torch_ms} "
                f"| {e['time_vs_one_hot']:.2f} | {e['time_vs_integer']:.2f} "
                f"| {100 * e['bandwidth_fraction']:.0f} | {_ratio(e, 'time_vs_torch')} "
                f"| {cpu} | {_mib(mem['ours'])} / {_mib(mem['one_hot'])} |"
            )
    print(
        "\n| (B, K) | dtype | forward: ours / integer | logsumexp alone / integer "
        "| one more read (row sum) / integer |"
    )
    print("|---|---|---:|---:|---:|")
    for res in result["results"]:
        e = res["forward"]
        print(
            f"| ({res['shape'][0]}, {res['shape'][1]}) | {res['dtype']} "
            f"| {e['time_vs_integer']:.2f} | {e['logsumexp_vs_integer']:.2f} "
            f"| {e['one_read_vs_integer']:.2f} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small shapes, for a smoke run"
    )
    main(quick=parser.parse_args().quick)
