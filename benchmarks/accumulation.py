"""What growing the batch costs: ``ow.accumulate`` and ``ow.adascale`` in a train step.

Claims, each a ratio of the time of one update (``K`` jitted micro-steps, each a
forward and backward pass over a micro-batch of 32 and an ``update``), measured as
the median over back-to-back pairs in alternating order:

- ``ow.accumulate(ow.sgd(...), batch_size=32·K, micro_batch_size=32)`` against
  ``optax.MultiSteps(ow.sgd(...), every_k_schedule=K)``: ≤ 1.05×;
- ``accumulate`` handing on the noise-scale norms against the same without them
  (``sq_norms=False``): ≤ 1.05×;
- ``accumulate(ow.adascale(ow.sgd, ...)(...))`` against ``accumulate(ow.sgd(...))``:
  ≤ 1.05×;

and the compiled memory of one micro-step (``memory_analysis``: arguments, outputs
and temporaries) against MultiSteps'. Each is measured with the micro-step's
parameters and optimizer state donated (``donate_argnums``, as a train loop that
keeps one copy does) and without: without donation, the ``lax.cond`` that skips the
inner update copies the inner state (the momentum) each micro-step, which
MultiSteps' masked update does not; with it, MultiSteps copies and this does not.
MultiSteps against itself is the control. Two models: the demo's ``SmallResNet1D``
(ghost BatchNorm over the micro-batch), where the backward pass dominates, and a
wide MLP of about 1.3M parameters, where the optimizer's per-parameter work shows
(MultiSteps runs the inner update at every micro-step).

Run ``python benchmarks/accumulation.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    first_call,
    interval_note,
    paired_ratio,
    run_header,
    verdict,
    verdict_cell,
    with_interval,
    write_result,
)

import optax_warmup as ow

MICRO = 32
TARGET = 1.05


class WideMLP(nnx.Module):
    """Three hidden layers of 1024: the optimizer's work per parameter shows."""

    def __init__(self, rngs: nnx.Rngs, width: int = 1024, features: int = 256):
        self.layers = nnx.List(
            [
                nnx.Linear(features, width, rngs=rngs),
                nnx.Linear(width, width, rngs=rngs),
                nnx.Linear(width, 10, rngs=rngs),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers[:-1]:
            x = nnx.relu(layer(x))
        return self.layers[-1](x)


def model_and_batch(name: str, quick: bool) -> tuple[nnx.Module, jax.Array, jax.Array]:
    rngs = nnx.Rngs(0)
    if name == "SmallResNet1D":
        widths = (4, 8, 8) if quick else (8, 16, 32)
        model = ow.models.SmallResNet1D(
            widths=widths, batch_norm_group_size=MICRO, rngs=rngs
        )
        x = jax.random.normal(jax.random.key(1), (MICRO, 40, 1))
    else:
        model = WideMLP(rngs, width=128 if quick else 1024)
        x = jax.random.normal(jax.random.key(1), (MICRO, 256))
    model.train()
    y = jax.random.randint(jax.random.key(2), (MICRO,), 0, 10)
    return model, x, y


def update_of(
    model: nnx.Module, tx: optax.GradientTransformation, k: int, donate: bool
) -> tuple[Callable[..., Any], Callable[..., Any], tuple]:
    """One update: ``k`` jitted micro-steps from the same start; the micro-step;
    and their arguments. With ``donate`` the micro-step donates the parameters and
    the optimizer state (the update copies its start first, on both sides alike)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, rest, x, y):
        model = nnx.merge(graphdef, params, rest, copy=True)
        loss = ow.smoothed_cross_entropy(model(x), y, alpha=0.1).mean()
        return loss, nnx.state(model, nnx.BatchStat)

    def micro_step(params, rest, opt_state, x, y):
        (_, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    micro_step = jax.jit(micro_step, donate_argnums=(0, 2) if donate else ())

    def update(params, rest, opt_state, x, y):
        if donate:
            params, opt_state = jax.tree.map(jnp.copy, (params, opt_state))
        for _ in range(k):
            params, opt_state = micro_step(params, rest, opt_state, x, y)
        return params, opt_state

    return update, micro_step, (params, rest, tx.init(params))


def memory(fn: Callable[..., Any], *args: Any) -> dict[str, int]:
    stats = fn.lower(*args).compile().memory_analysis()
    return {
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
    }


COMPARISONS = (
    # label, baseline, candidate
    ("control: MultiSteps / itself", "multisteps", "multisteps"),
    ("accumulate / MultiSteps", "multisteps", "accumulate"),
    ("norms on / off", "accumulate_no_norms", "accumulate"),
    ("AdaScale / plain", "accumulate", "accumulate_adascale"),
)


def measure(name: str, k: int, pairs: int, quick: bool, donate: bool) -> dict:
    model, x, y = model_and_batch(name, quick)
    sgd = ow.sgd(0.1, momentum=0.9)
    batch = MICRO * k
    ada = ow.adascale(ow.sgd, reference_batch_size=MICRO)(
        learning_rate=0.1, momentum=0.9
    )
    txs = {
        "multisteps": optax.MultiSteps(sgd, every_k_schedule=k),
        "accumulate": ow.accumulate(sgd, batch_size=batch, micro_batch_size=MICRO),
        "accumulate_no_norms": ow.accumulate(
            sgd, batch_size=batch, micro_batch_size=MICRO, sq_norms=False
        ),
        "accumulate_adascale": ow.accumulate(
            ada, batch_size=batch, micro_batch_size=MICRO
        ),
    }
    steps = {key: update_of(model, tx, k, donate) for key, tx in txs.items()}
    args = {key: (*s[2], x, y) for key, s in steps.items()}
    first = {key: first_call(steps[key][0], *args[key]) for key in steps}
    ratios = {}
    for label, base, ours in COMPARISONS:
        r = paired_ratio(steps[base][0], args[base], steps[ours][0], args[ours], pairs)
        if not label.startswith("control"):
            r["verdict"] = verdict(r["ratio_interval"], TARGET)
        ratios[label] = r
    memories = {
        key: memory(steps[key][1], *args[key]) for key in ("multisteps", "accumulate")
    }
    parameters = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return {
        "model": name,
        "parameters": int(parameters),
        "donated": donate,
        "micro_batch": MICRO,
        "micro_steps_per_update": k,
        "first_call_s": first,
        "compared_to": ratios,
        "memory": memories,
    }


def main(quick: bool = False) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    k, pairs = (4, 6) if quick else (8, 40)
    rows = [
        measure(name, k, pairs, quick, donate)
        for name in ("SmallResNet1D", "WideMLP")
        for donate in (False, True)
    ]
    result = {
        "rows": rows,
        "target_ratio": TARGET,
        "quick": quick,
        "pairs": pairs,
        "load_average_1min": [load_before, os.getloadavg()[0]],
    }
    write_result("accumulation-quick" if quick else "accumulation", result)
    print_table(result)
    return result


def print_table(result: dict[str, Any]) -> None:
    k = result["rows"][0]["micro_steps_per_update"]
    print(
        run_header(
            f"one update = {k} jitted micro-steps of {MICRO} (forward, backward, "
            "update)",
            result["load_average_1min"],
        )
    )
    labels = [label for label, _, _ in COMPARISONS]
    print(f"| model | donated | {' | '.join(labels)} |")
    print("|---|---|" + "---:|" * len(labels))
    for row in result["rows"]:
        cells = []
        for label in labels:
            r = row["compared_to"][label]
            cell = with_interval(r["ratio"], r["ratio_interval"])
            if "verdict" in r:
                cell += f" {verdict_cell(r['verdict'])}"
            cells.append(cell)
        donated = "yes" if row["donated"] else "no"
        print(
            f"| {row['model']} ({row['parameters']:,}) | {donated} | "
            f"{' | '.join(cells)} |"
        )
    print(f"\nTarget ≤ {result['target_ratio']} each. {interval_note(result['pairs'])}")
    print("\n| model | donated | micro-step memory (MiB) | MultiSteps | accumulate |")
    print("|---|---|---|---:|---:|")
    for row in result["rows"]:
        donated = "yes" if row["donated"] else "no"
        for part in ("argument_bytes", "output_bytes", "temp_bytes"):
            a = row["memory"]["multisteps"][part] / 2**20
            b = row["memory"]["accumulate"][part] / 2**20
            what = part.removesuffix("_bytes")
            print(f"| {row['model']} | {donated} | {what} | {a:.2f} | {b:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    main(quick=parser.parse_args().quick)
