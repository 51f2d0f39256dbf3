"""What goyal_sgd costs in a train step: time, and the HLO operations of its schedule.

Claim: a jitted train step of a small CNN with BatchNorm takes no more than
2% longer with ``ow.goyal_sgd`` (masked weight decay, gradual warmup, milestones)
than with ``optax.sgd`` at a constant rate with the same momentum and no decay; and
``ow.goyal_schedule`` compiles to fewer HLO operations than the same schedule built
from ``optax.join_schedules`` and ``optax.piecewise_constant_schedule``.

Run ``python benchmarks/goyal_sgd_step.py`` (``--quick`` for a smoke run). The model
is a small ResNet from ``optax_warmup.models`` (a 3×3 stem and two stages of one
BasicBlock, widths 16 and 32) on a CIFAR-sized batch of 128 × 32 × 32 × 3. Each step
is compared with ``optax.sgd`` at a constant rate over back-to-back pairs of calls in
alternating order (first calls apart): the time ratio is the median over the pairs,
with a 95% bootstrap interval over them, and both medians come from the same pairs,
which holds steady on a machine that other jobs load. The constant-rate step against
itself is the control: its interval is the noise alone. The target is met only when
the whole interval is under it.

On an accelerator it also times the step at ImageNet size: ResNet-50 (bfloat16
compute, float32 parameters) on a batch of 256 × 224 × 224 × 3, ``goyal_sgd`` against
constant-rate ``optax.sgd`` (and against itself, the control), with the same target
(≤ 1.02×). On CPU that section is
skipped (it would take minutes a step); ``--quick`` runs it with a small bottleneck
ResNet on a batch of 4 × 32 × 32 × 3, so that the same code runs everywhere.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    first_call,
    hlo_ops,
    interval_note,
    paired_ratio,
    run_header,
    verdict,
    verdict_cell,
    with_interval,
    write_result,
)

import optax_warmup as ow

BATCH_SIZE, STEPS_PER_EPOCH = 8192, 156  # Goyal et al.'s 8k ImageNet run
BASE = "optax.sgd(constant)"  # against itself: the control
TARGET = 1.02  # for ow.goyal_sgd against BASE


def make_model(quick: bool) -> nnx.Module:
    """A small 2-D ResNet with BatchNorm from ``ow.models``."""
    return ow.models.ResNet(
        (1, 1),
        widths=(8, 16) if quick else (16, 32),
        num_classes=10,
        in_features=3,
        small_input=True,
        rngs=nnx.Rngs(0),
    )


def optax_goyal_schedule() -> optax.Schedule:
    """Goyal's schedule from optax parts: join_schedules + piecewise_constant."""
    peak = 0.1 * BATCH_SIZE / 256
    warmup = 5 * STEPS_PER_EPOCH
    decay = optax.piecewise_constant_schedule(
        peak, {m * STEPS_PER_EPOCH - warmup: 0.1 for m in (30, 60, 80)}
    )
    return optax.join_schedules(
        [optax.linear_schedule(0.1, peak, warmup), decay], [warmup]
    )


def optimizers() -> dict[str, optax.GradientTransformation]:
    return {
        "optax.sgd(constant)": optax.sgd(0.1, momentum=0.9),
        "ow.goyal_sgd": ow.goyal_sgd(BATCH_SIZE, STEPS_PER_EPOCH),
        "optax chain (join_schedules)": optax.chain(
            optax.masked(optax.add_decayed_weights(1e-4), ow.decay_mask),
            optax.inject_hyperparams(optax.sgd)(
                learning_rate=optax_goyal_schedule(), momentum=0.9
            ),
        ),
    }


def make_step(graphdef: Any, tx: optax.GradientTransformation):
    @jax.jit
    def step(params, rest, opt_state, x, y):
        model = nnx.merge(graphdef, params, rest)

        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        updates, opt_state = tx.update(grads, opt_state, params)
        rest = nnx.state(model, nnx.Not(nnx.Param))
        return optax.apply_updates(params, updates), rest, opt_state, loss

    return step


def imagenet_step(quick: bool, backend: str) -> dict[str, Any]:
    """goyal_sgd against constant-rate optax.sgd on a ResNet-50 step, in bfloat16.

    Skipped on CPU unless ``quick``, which shrinks the model and the batch.
    """
    if backend == "cpu" and not quick:
        return {
            "skipped": "ResNet-50 at batch 256 x 224 x 224 runs on accelerators "
            "only; --quick runs a small bottleneck ResNet on CPU"
        }
    if quick:
        model = ow.models.ResNet(
            (1, 1, 1, 1),
            block=ow.models.Bottleneck,
            widths=(8, 16, 32, 64),
            num_classes=10,
            dtype=jnp.bfloat16,
            rngs=nnx.Rngs(0),
        )
        batch, side, classes, pairs = 4, 32, 10, 4
    else:
        model = ow.models.ResNet50(dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        batch, side, classes, pairs = 256, 224, 1000, 30
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (batch, side, side, 3), jnp.bfloat16)
    y = jax.random.randint(jax.random.key(2), (batch,), 0, classes)
    txs = {
        BASE: optax.sgd(0.1, momentum=0.9),
        "ow.goyal_sgd": optimizers()["ow.goyal_sgd"],
    }
    compared = compare_steps(graphdef, params, rest, x, y, txs, pairs)
    del compared["steps"]
    result = {
        "model": "ResNet-50" if not quick else "small bottleneck ResNet",
        "parameters": sum(p.size for p in jax.tree.leaves(params)),
        "batch_shape": list(x.shape),
        "compute_dtype": "bfloat16",
        "pairs": pairs,
        **compared,
        "target_ratio": TARGET,
    }
    result["verdict"] = verdict(
        result["compared_to_sgd_constant"]["ow.goyal_sgd"]["ratio_interval"], TARGET
    )
    return result


def compare_steps(graphdef, params, rest, x, y, txs, pairs) -> dict[str, Any]:
    """Every step of ``txs`` against ``BASE`` (itself too), in pairs; and under
    ``"steps"``, the jitted steps and their arguments."""
    steps, args, first = {}, {}, {}
    for name, tx in txs.items():
        steps[name] = make_step(graphdef, tx)
        args[name] = (params, rest, tx.init(params), x, y)
        first[name] = first_call(steps[name], *args[name])
    return {
        "first_call_s": first,
        "compared_to_sgd_constant": {
            name: paired_ratio(steps[BASE], args[BASE], steps[name], args[name], pairs)
            for name in steps
        },
        "steps": (steps, args),
    }


def main(quick: bool = False) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    model = make_model(quick)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch, side = (16, 8) if quick else (128, 32)  # CIFAR-sized batch
    x = jax.random.normal(jax.random.key(1), (batch, side, side, 3))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    pairs = 6 if quick else 60
    compared = compare_steps(graphdef, params, rest, x, y, optimizers(), pairs)
    steps, args = compared.pop("steps")

    count = jnp.zeros([], jnp.int32)
    schedule_ops = {
        "ow.goyal_schedule": hlo_ops(
            ow.goyal_schedule(BATCH_SIZE, STEPS_PER_EPOCH), count
        ),
        "optax join_schedules": hlo_ops(optax_goyal_schedule(), count),
    }
    step_ops = {
        name: hlo_ops(step, *args[name])["compiled"] for name, step in steps.items()
    }

    result = {
        "model": type(model).__name__,
        "parameters": sum(p.size for p in jax.tree.leaves(params)),
        "batch_shape": list(x.shape),
        "pairs": pairs,
        "quick": quick,
        "load_average_1min": [load_before, os.getloadavg()[0]],
        **compared,
        "target_ratio": TARGET,
        "verdict": verdict(
            compared["compared_to_sgd_constant"]["ow.goyal_sgd"]["ratio_interval"],
            TARGET,
        ),
        "schedule_hlo_ops": schedule_ops,
        "train_step_hlo_ops_compiled": step_ops,
        "train_step_hlo_ops_added_vs_sgd_constant": {
            n: ops - step_ops[BASE] for n, ops in step_ops.items()
        },
    }
    result["imagenet_step"] = imagenet_step(quick, jax.default_backend())
    # A quick run must not overwrite the measured numbers that the README quotes.
    write_result("goyal_sgd_step-quick" if quick else "goyal_sgd_step", result)
    print_table(result)
    return result


def _rows(result: dict[str, Any]) -> list[str]:
    """The rows of one comparison with ``BASE``: each step, its ratio and verdict."""
    rows = []
    for name, c in result["compared_to_sgd_constant"].items():
        if name == BASE:
            label, word = f"{name} (control: against itself)", "(the noise)"
        else:
            label = name
            word = verdict_cell(result["verdict"]) if name == "ow.goyal_sgd" else "–"
        added = result.get("train_step_hlo_ops_added_vs_sgd_constant", {})
        cells = [
            label,
            f"{c['median_s'] * 1e3:.2f}",
            f"{result['first_call_s'][name]:.2f}",
            with_interval(c["ratio"], c["ratio_interval"]),
            f"{c['difference_s'] * 1e3:.2f}",
        ]
        if added:
            cells.append(str(added[name]))
        rows.append("| " + " | ".join([*cells, word]) + " |")
    return rows


def print_table(result: dict[str, Any]) -> None:
    print(
        run_header(
            f"{result['model']} ({result['parameters']:,} parameters), batch "
            f"{tuple(result['batch_shape'])}",
            result["load_average_1min"],
        )
    )
    target = result["target_ratio"]
    print(
        "| train step | median (ms) | first call (s) "
        "| time ratio vs sgd(constant) [95%] | extra time (ms) | HLO ops added "
        f"| target ≤ {target} |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    print("\n".join(_rows(result)))
    print(f"\n{interval_note(result['pairs'])}")
    big = result["imagenet_step"]
    if "skipped" in big:
        print(f"\nImageNet-sized step: skipped ({big['skipped']}).")
    else:
        print(
            f"\n| {big['model']} step, batch {tuple(big['batch_shape'])}, "
            f"{big['compute_dtype']} | median (ms) | first call (s) "
            "| time ratio vs sgd(constant) [95%] | extra time (ms) "
            f"| target ≤ {big['target_ratio']} |"
        )
        print("|---|---:|---:|---:|---:|---|")
        print("\n".join(_rows(big)))
        print(f"\n{interval_note(big['pairs'])}")
    print("\n| schedule alone | HLO ops (lowered) | HLO ops (compiled) |")
    print("|---|---:|---:|")
    for name, ops in result["schedule_hlo_ops"].items():
        print(f"| {name} | {ops['lowered']} | {ops['compiled']} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    main(quick=parser.parse_args().quick)
