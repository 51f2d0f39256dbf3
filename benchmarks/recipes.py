"""What the recipes cost in a train step against optax with hand-built masks.

Claim: a jitted train step of a small ResNet with ``ow.sgd``, ``ow.lars``,
``ow.lamb`` or ``ow.adamw`` takes no more than 2% longer than the same step with the
optax construct that computes the same update, given the mask by hand:
``optax.sgd`` after ``optax.masked(optax.add_decayed_weights(...))``,
``optax.lars(weight_decay_mask=m, trust_ratio_mask=m)``, the ``scale_by_adam →
add_decayed_weights → masked(scale_by_trust_ratio) → scale_by_learning_rate`` chain
for LAMB, and ``optax.adamw(mask=m)``; both sides use the same learning-rate
schedule. Also: ``ow.wsd_schedule`` compiles to no more HLO operations than the same
schedule built from ``optax.join_schedules``.

Run ``python benchmarks/recipes.py`` (``--quick`` for a smoke run). The model is the
small ResNet of ``goyal_sgd_step.py`` (a 3×3 stem, two stages of one BasicBlock,
widths 16 and 32) on a batch of 128 × 32 × 32 × 3. The time ratio of each recipe is
the median over back-to-back pairs of calls (recipe, optax) in alternating order,
with a 95% bootstrap interval over the pairs; the two medians come from the same
pairs. A control, optax's SGD step against itself, shows the noise. A target is met
only when the ratio's whole interval is under it (``_common.verdict``).
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

SCHEDULE = ow.goyal_schedule(batch_size=8192, steps_per_epoch=156)
WSD = dict(warmup_steps=500, stable_steps=8000, decay_steps=1500)


def hand_mask(params: Any) -> Any:
    """The rule of ``decay_mask`` for this model, written by hand: kernels only."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def pairs_of_optimizers(params: Any) -> dict[str, tuple[Any, Any]]:
    """recipe -> (ours, the optax construct with the hand-built mask)."""
    m = hand_mask(params)
    lamb_by_hand = optax.chain(
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-6),
        optax.add_decayed_weights(0.01, mask=m),
        optax.masked(optax.scale_by_trust_ratio(), m),
        optax.scale_by_learning_rate(SCHEDULE),
    )
    return {
        "sgd": (
            ow.sgd(SCHEDULE),
            optax.chain(
                optax.masked(optax.add_decayed_weights(1e-4), m),
                optax.sgd(SCHEDULE, momentum=0.9),
            ),
        ),
        "lars": (
            ow.lars(SCHEDULE),
            optax.lars(
                SCHEDULE,
                weight_decay=1e-4,
                weight_decay_mask=m,
                trust_ratio_mask=m,
                momentum=0.9,
            ),
        ),
        "lamb": (ow.lamb(SCHEDULE), lamb_by_hand),
        "adamw": (
            ow.adamw(SCHEDULE),
            optax.adamw(SCHEDULE, weight_decay=1e-4, mask=m),
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


def optax_wsd() -> optax.Schedule:
    w, s, d = WSD["warmup_steps"], WSD["stable_steps"], WSD["decay_steps"]
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, 1.0, w),
            optax.constant_schedule(1.0),
            optax.linear_schedule(1.0, 0.0, d),
            optax.constant_schedule(0.0),
        ],
        [w, w + s, w + s + d],
    )


CONTROL = "control"  # optax's SGD step against itself
TARGET = 1.02


def main(quick: bool = False) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    widths = (8, 16) if quick else (16, 32)
    model = ow.models.ResNet(
        (1, 1),
        widths=widths,
        num_classes=10,
        in_features=3,
        small_input=True,
        rngs=nnx.Rngs(0),
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    assert jax.tree.leaves(hand_mask(params)) == jax.tree.leaves(ow.decay_mask(params))
    batch, side = (16, 8) if quick else (128, 32)
    x = jax.random.normal(jax.random.key(1), (batch, side, side, 3))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    pairs = 6 if quick else 60

    optimizers = pairs_of_optimizers(params)
    optimizers[CONTROL] = (optimizers["sgd"][1], optimizers["sgd"][1])
    first_calls, compared, step_ops = {}, {}, {}
    for name, (ours, theirs) in optimizers.items():
        steps, args = {}, {}
        for side_name, tx in (("ow", ours), ("optax", theirs)):
            steps[side_name] = make_step(graphdef, tx)
            args[side_name] = (params, rest, tx.init(params), x, y)
            first_calls[f"{side_name}.{name}"] = first_call(
                steps[side_name], *args[side_name]
            )
        step_ops[name] = {
            side: hlo_ops(steps[side], *args[side])["compiled"] for side in steps
        }
        compared[name] = paired_ratio(
            steps["optax"], args["optax"], steps["ow"], args["ow"], pairs
        )

    count = jnp.zeros([], jnp.int32)
    schedule_ops = {
        "ow.wsd_schedule(linear)": hlo_ops(
            ow.wsd_schedule(1.0, decay_shape="linear", **WSD), count
        ),
        "ow.wsd_schedule(1-sqrt)": hlo_ops(ow.wsd_schedule(1.0, **WSD), count),
        "optax join_schedules(linear)": hlo_ops(optax_wsd(), count),
    }
    result = {
        "model": f"ResNet((1, 1), widths={widths}, small_input=True)",
        "parameters": sum(p.size for p in jax.tree.leaves(params)),
        "batch_shape": list(x.shape),
        "pairs": pairs,
        "quick": quick,
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "first_call_s": first_calls,
        "compared_to_optax": compared,
        "target_ratio": TARGET,
        "verdict": {
            name: verdict(c["ratio_interval"], TARGET)
            for name, c in compared.items()
            if name != CONTROL
        },
        "schedule_hlo_ops": schedule_ops,
        "train_step_hlo_ops_compiled": step_ops,
    }
    write_result("recipes-quick" if quick else "recipes", result)
    print_table(result)
    return result


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
        "| recipe | ow step (ms) | optax step (ms) | time ratio ow / optax [95%] "
        f"| extra time (ms) | HLO ops ow / optax | target ≤ {target} |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, c in result["compared_to_optax"].items():
        ops = result["train_step_hlo_ops_compiled"][name]
        label = "control: optax sgd / itself" if name == CONTROL else name
        word = result["verdict"].get(name, "(the noise)")
        print(
            f"| {label} | {c['median_s'] * 1e3:.2f} | {c['base_median_s'] * 1e3:.2f} "
            f"| {with_interval(c['ratio'], c['ratio_interval'])} "
            f"| {c['difference_s'] * 1e3:.2f} | {ops['ow']} / {ops['optax']} "
            f"| {verdict_cell(word)} |"
        )
    print(f"\n{interval_note(result['pairs'])}")
    print("\n| schedule alone | HLO ops (lowered) | HLO ops (compiled) |")
    print("|---|---:|---:|")
    for name, ops in result["schedule_hlo_ops"].items():
        print(f"| {name} | {ops['lowered']} | {ops['compiled']} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    main(quick=parser.parse_args().quick)
