"""What measuring the gradient noise scale costs in the demo's train step.

Claim: the jitted train step of the demo's model (``SmallResNet1D``, widths 8, 16,
32, ghost BatchNorm over groups of n = 32) at kn = 1024 with the noise scale
tracked takes at most 1.2× the same step without it. Tracked: the gradients of the
32 ghost BatchNorm groups from ``ow.value_and_grad_by_group`` (one ``vmap`` over the
groups), their mean as the batch's gradient, and ``ow.track_noise_scale`` chained
before ``ow.goyal_sgd``. Untracked: ``jax.value_and_grad`` of the whole batch and
``ow.goyal_sgd``. Both steps compute the same loss, the same gradient (up to
rounding) and the same update; the ratio is the median over back-to-back pairs of
calls in alternating order, with a 95% bootstrap interval over the pairs, and both
medians come from the same pairs. The plain step against itself is the control. The
target is met only when the whole interval is under it.

Run ``python benchmarks/noise_scale.py`` (``--quick`` for a smoke run).
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

GROUP = 32  # n: the ghost BatchNorm group and the small batch of the estimate
TARGET = 1.2


def make_steps(batch: int, widths: tuple[int, ...]) -> dict[str, Any]:
    """The two train steps (``plain``, ``tracked``) and their arguments."""
    model = ow.models.SmallResNet1D(
        widths=widths, batch_norm_group_size=GROUP, rngs=nnx.Rngs(0)
    )
    model.train()
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    recipe = ow.goyal_sgd(
        batch_size=batch,
        steps_per_epoch=16,
        base_lr=0.1,
        base_batch_size=GROUP,
        warmup_epochs=2,
        milestones=(10,),
    )
    tracked_tx = optax.chain(ow.track_noise_scale(GROUP, batch), recipe)

    def loss_fn(params, stats, x, y):
        model = nnx.merge(graphdef, params, stats, copy=True)
        loss = ow.smoothed_cross_entropy(model(x), y, alpha=0.1).mean()
        return loss, nnx.state(model, nnx.BatchStat)

    @jax.jit
    def plain(params, stats, opt_state, x, y):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, stats), grads = grad_fn(params, stats, x, y)
        updates, opt_state = recipe.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    by_group = ow.value_and_grad_by_group(
        loss_fn, group_size=GROUP, has_aux=True, batch_argnums=(2, 3)
    )

    @jax.jit
    def tracked(params, stats, opt_state, x, y):
        (loss, stats), grads, small, big = by_group(params, stats, x, y)
        stats = jax.tree.map(lambda s: s.mean(0), stats)
        updates, opt_state = tracked_tx.update(
            grads, opt_state, params, small_sq_norm=small, big_sq_norm=big
        )
        return optax.apply_updates(params, updates), stats, opt_state, loss

    x = jax.random.normal(jax.random.key(1), (batch, 40, 1))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    return {
        "plain": (plain, (params, stats, recipe.init(params), x, y)),
        "tracked": (tracked, (params, stats, tracked_tx.init(params), x, y)),
        "parameters": sum(p.size for p in jax.tree.leaves(params)),
    }


def same_update(steps: dict[str, Any]) -> float:
    """The largest difference between the two steps' new parameters."""
    new = {name: steps[name][0](*steps[name][1])[0] for name in ("plain", "tracked")}
    differences = jax.tree.map(
        lambda a, b: jnp.max(jnp.abs(a - b)), new["plain"], new["tracked"]
    )
    return float(max(jax.tree.leaves(differences)))


def main(quick: bool = False) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    batch = 256 if quick else 1024
    widths = (8, 16, 32)
    steps = make_steps(batch, widths)
    pairs = 6 if quick else 60
    first_calls = {
        name: first_call(steps[name][0], *steps[name][1])
        for name in ("plain", "tracked")
    }
    compared = {
        "tracked": paired_ratio(*steps["plain"], *steps["tracked"], pairs),
        "control": paired_ratio(*steps["plain"], *steps["plain"], pairs),
    }
    max_difference = same_update(steps)
    ops = {
        name: hlo_ops(steps[name][0], *steps[name][1])["compiled"]
        for name in ("plain", "tracked")
    }
    result = {
        "model": f"SmallResNet1D(widths={widths}, batch_norm_group_size={GROUP})",
        "parameters": steps["parameters"],
        "batch": batch,
        "groups": batch // GROUP,
        "pairs": pairs,
        "quick": quick,
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "first_call_s": first_calls,
        "compared_to_plain": compared,
        "target_ratio": TARGET,
        "verdict": verdict(compared["tracked"]["ratio_interval"], TARGET),
        "max_parameter_difference": max_difference,
        "train_step_hlo_ops_compiled": ops,
    }
    write_result("noise_scale-quick" if quick else "noise_scale", result)
    print_table(result)
    return result


def print_table(result: dict[str, Any]) -> None:
    print(
        run_header(
            f"{result['model']} ({result['parameters']:,} parameters), batch "
            f"{result['batch']} ({result['groups']} groups)",
            result["load_average_1min"],
        )
    )
    ops = result["train_step_hlo_ops_compiled"]
    print(
        "| step | plain (ms) | compared (ms) | time ratio [95%] | extra (ms) "
        f"| HLO ops | target ≤ {result['target_ratio']} |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    rows = (
        ("tracked", "noise scale tracked", f"{ops['tracked']} / {ops['plain']}"),
        ("control", "control: plain / itself", f"{ops['plain']} / {ops['plain']}"),
    )
    for name, label, hlo in rows:
        c = result["compared_to_plain"][name]
        word = verdict_cell(result["verdict"]) if name == "tracked" else "(the noise)"
        print(
            f"| {label}, kn={result['batch']} | {c['base_median_s'] * 1e3:.2f} "
            f"| {c['median_s'] * 1e3:.2f} "
            f"| {with_interval(c['ratio'], c['ratio_interval'])} "
            f"| {c['difference_s'] * 1e3:.2f} | {hlo} | {word} |"
        )
    print(f"\n{interval_note(result['pairs'])}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    main(quick=parser.parse_args().quick)
