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
shapes). The candidates of one shape and mode are timed in interleaved rounds (each
round calls each once, back to back, in a rotating order), so that a load change on
a shared machine hits them alike; the medians and the ratios come from the same
rounds, each ratio with a 95% bootstrap interval over the rounds, and a target is
met only when the whole interval is on its side (``_common.verdict``). On an
accelerator each timed call is ``CALLS`` calls dispatched back to back and waited
for once, so that dispatch does not count.
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
from _common import (
    bootstrap_interval,
    compare,
    environment,
    first_call,
    interleaved_times,
    verdict,
    verdict_cell,
    with_interval,
    write_result,
)

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
    calls: int = 1,
    cpu: bool = True,
) -> dict[str, dict[str, Any]]:
    """Times the candidates in ``rounds`` interleaved rounds (``_common``).

    Per candidate: the first call apart, then the wall-clock seconds of each round
    (``rounds_s``, per call of the candidate: each timed call runs it ``calls``
    times back to back) and their median. On CPU the process CPU time of as many
    more rounds is kept beside it (``cpu``: ``cpu_rounds_s`` and ``cpu_s``), as it
    is steadier on a machine shared with other work (it still counts a thread that
    spins while it waits).
    """
    timed = {name: (back_to_back(fn, calls), ()) for name, fn in candidates.items()}
    first = {name: first_call(fn, warmup=1) for name, (fn, _) in timed.items()}
    wall = interleaved_times(timed, rounds)
    result: dict[str, dict[str, Any]] = {}
    for name, seconds in wall.items():
        per_call = [t / calls for t in seconds]
        result[name] = {
            "first_call_s": first[name],
            "rounds_s": per_call,
            "median_s": statistics.median(per_call),
            "min_s": min(per_call),
        }
    if cpu:
        for name, seconds in interleaved_times(
            timed, rounds, time.process_time
        ).items():
            per_call = [t / calls for t in seconds]
            result[name]["cpu_rounds_s"] = per_call
            result[name]["cpu_s"] = statistics.median(per_call)
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
    batch: int, num_classes: int, dtype: str, rounds: int, run: dict
) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    logits32 = 3 * rng.standard_normal((batch, num_classes), np.float32)
    logits = jnp.asarray(logits32, dtype)
    del logits32
    labels = jnp.asarray(rng.integers(0, num_classes, size=batch, dtype=np.int32))
    logits_bytes = logits.size * logits.dtype.itemsize
    timing = dict(rounds=rounds, calls=run["calls"], cpu=run["cpu"])

    # The floor: the copy bandwidth, one read plus one write of the logits' bytes,
    # from the faster of a device-to-device copy and an in-place negation (donated,
    # so that a CPU does not fault in fresh pages on every call).
    copies = interleaved(
        {"device_copy": device_copy(logits), "in_place": in_place_negation(logits)},
        **(timing | {"cpu": False}),
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
        result[mode] = compare_losses(times, memory, floors[mode], run)
        del jitted, candidates
    return result


def compare_losses(
    times: dict[str, dict[str, Any]],
    memory: dict[str, int],
    floor_s: float,
    run: dict[str, Any],
) -> dict[str, Any]:
    """The ratios of one shape and mode, each from the same rounds, with intervals.

    ``ratios`` holds ``compare``'s result for each ratio of times (``time_vs_*``,
    and ``cpu_vs_*`` on CPU); the bandwidth fraction, floor / time, gets its
    interval over the rounds of ours; the memory ratio is exact. ``verdicts`` says,
    per target, "met", "missed" or "not resolved".
    """
    rounds = {name: v["rounds_s"] for name, v in times.items()}
    pairs = {"time_vs_one_hot": "one_hot", "time_vs_integer": "integer"}
    if "torch" in rounds:
        pairs["time_vs_torch"] = "torch"
    if "floor_logsumexp" in rounds:  # the forward pass: what it cannot avoid
        pairs["logsumexp_vs_integer"] = "integer"
        pairs["one_read_vs_integer"] = "integer"
    ours = {
        "logsumexp_vs_integer": "floor_logsumexp",
        "one_read_vs_integer": "floor_row_sum",
    }
    ratios = {
        key: compare(rounds[base], rounds[ours.get(key, "ours")])
        for key, base in pairs.items()
    }
    if run["cpu"]:
        cpu = {name: v["cpu_rounds_s"] for name, v in times.items()}
        for key, base in (("one_hot", "one_hot"), ("integer", "integer")):
            ratios[f"cpu_vs_{key}"] = compare(cpu[base], cpu["ours"])
        if "torch" in cpu:
            ratios["cpu_vs_torch"] = compare(cpu["torch"], cpu["ours"])
    fractions = [floor_s / t for t in rounds["ours"]]
    entry: dict[str, Any] = {
        "temp_bytes": memory,
        "times": times,
        "floor_s": floor_s,
        "ratios": ratios,
        "memory_vs_one_hot": memory["ours"] / memory["one_hot"],
        "bandwidth_fraction": statistics.median(fractions),
        "bandwidth_fraction_interval": bootstrap_interval(fractions),
        "time_vs_floor": times["ours"]["median_s"] / floor_s,
    }
    for key, c in ratios.items():
        entry[key] = c["ratio"]
    intervals = {key: c["ratio_interval"] for key, c in ratios.items()}
    intervals["memory_vs_one_hot"] = [entry["memory_vs_one_hot"]] * 2  # exact
    intervals["bandwidth_fraction"] = entry["bandwidth_fraction_interval"]
    entry["verdicts"] = {
        key: verdict(intervals[key], bound) for key, bound in run["targets"].items()
    } | {
        key: verdict(intervals[key], bound, at_least=True)
        for key, bound in run["at_least"].items()
    }
    return entry


def main(quick: bool = False) -> dict[str, Any]:
    rounds = 4 if quick else 15
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
            results.append(bench_shape(batch, num_classes, dtype, rounds, run))
    result = {
        "quick": quick,
        "rounds": rounds,
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
    """``0.25 [0.24, 0.26]``: a ratio and its interval, or – where there is none."""
    if key not in entry.get("ratios", {}):
        return "–"
    c = entry["ratios"][key]
    return with_interval(c["ratio"], c["ratio_interval"], digits=2)


def _verdicts(entry: dict[str, Any]) -> str:
    """The verdict of each target of the row, named: ``memory met, one-hot met``."""
    names = {
        "memory_vs_one_hot": "memory",
        "time_vs_one_hot": "vs one-hot",
        "time_vs_integer": "vs integer",
        "bandwidth_fraction": "bandwidth",
    }
    return ", ".join(
        f"{names.get(key, key)} {verdict_cell(word)}"
        for key, word in entry["verdicts"].items()
    )


def print_table(result: dict[str, Any]) -> None:
    """The Markdown tables for the docs: medians, ratios, memory; the forward floor."""
    print(
        "\n| (B, K) | dtype | pass | ours ms | one-hot ms | integer ms | torch ms "
        "| ours / one-hot [95%] | ours / integer [95%] | % of copy bandwidth [95%] "
        "| ours / torch [95%] | CPU-time ratios (one-hot, integer, torch) "
        "| temp MiB ours / one-hot | targets |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for res in result["results"]:
        shape = f"({res['shape'][0]}, {res['shape'][1]})"
        for mode, label in (("forward", "fwd"), ("forward_backward", "fwd+bwd")):
            e = res[mode]
            t = {name: v["median_s"] for name, v in e["times"].items()}
            torch_ms = _ms(t["torch"]) if "torch" in t else "–"
            mem = e["temp_bytes"]
            cpu = ", ".join(
                f"{e['ratios'][key]['ratio']:.2f}" if key in e["ratios"] else "–"
                for key in ("cpu_vs_one_hot", "cpu_vs_integer", "cpu_vs_torch")
            )
            low, high = (100 * x for x in e["bandwidth_fraction_interval"])
            bandwidth = f"{100 * e['bandwidth_fraction']:.0f} [{low:.0f}, {high:.0f}]"
            print(
                f"| {shape} | {res['dtype']} | {label} | {_ms(t['ours'])} "
                f"| {_ms(t['one_hot'])} | {_ms(t['integer'])} | {torch_ms} "
                f"| {_ratio(e, 'time_vs_one_hot')} | {_ratio(e, 'time_vs_integer')} "
                f"| {bandwidth} | {_ratio(e, 'time_vs_torch')} "
                f"| {cpu} | {_mib(mem['ours'])} / {_mib(mem['one_hot'])} "
                f"| {_verdicts(e)} |"
            )
    print(
        f"\nMedians and ratios over {result['rounds']} interleaved rounds, each ratio "
        "with its 95% bootstrap interval over the rounds. A target is met when the "
        "whole interval is on its side, missed when it is all on the other, not "
        "resolved when it contains it."
    )
    print(
        "\n| (B, K) | dtype | forward: ours / integer [95%] "
        "| logsumexp alone / integer [95%] | one more read (row sum) / integer [95%] |"
    )
    print("|---|---|---:|---:|---:|")
    for res in result["results"]:
        e = res["forward"]
        print(
            f"| ({res['shape'][0]}, {res['shape'][1]}) | {res['dtype']} "
            f"| {_ratio(e, 'time_vs_integer')} | {_ratio(e, 'logsumexp_vs_integer')} "
            f"| {_ratio(e, 'one_read_vs_integer')} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small shapes, for a smoke run"
    )
    main(quick=parser.parse_args().quick)
