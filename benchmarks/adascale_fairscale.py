"""``ow.adascale`` against the authors' implementation, ``fairscale.optim.AdaScale``.

Both sides train the same least-squares model in float64 from the same micro-batches:
fairscale around ``torch.optim.SGD`` with ``num_gradients_to_accumulate = G`` and the
loss scaled by ``1/G`` (its default), the rate set to ``η(τ)`` after each step as its
docstring's second example does; ours ``ow.accumulate(ow.adascale(optax.sgd, ...))``
with micro-batch gradients from ``jax.grad``. At every update it records the gain,
the scale-invariant iterations τ, the rate used and the weights, and reports the
largest relative difference of each over the run. Needs the ``bench`` extra (torch and
fairscale: ``pip install -e ".[bench]"``); without them it says so and records
nothing.

  python benchmarks/adascale_fairscale.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

CASES = [
    # name, micro-batch, groups G, reference batch, smoothing, momentum, updates
    ("S=G, momentum 0.9", 4, 8, 4, None, 0.9, 30),
    ("S=G/2 (reference 2 micro-batches)", 4, 8, 8, None, 0.0, 30),
    ("smoothing 0.9, momentum 0.5", 2, 16, 2, 0.9, 0.5, 30),
]
DIM, OUT = 6, 3


def schedule(tau: float) -> float:
    """η(τ): a cosine decay from 0.2 over 40 reference iterations, then 0."""
    progress = min(tau / 40.0, 1.0)
    return 0.2 * 0.5 * (1 + math.cos(math.pi * progress))


def data(case_seed: int, updates: int, groups: int, micro: int) -> tuple[Any, Any]:
    rng = np.random.default_rng(case_seed)
    x = rng.normal(size=(updates * groups, micro, DIM))
    true_w = rng.normal(size=(DIM, OUT))
    y = x @ true_w + 0.5 * rng.normal(size=(updates * groups, micro, OUT))
    return x, y


def run_fairscale(case: tuple, x: np.ndarray, y: np.ndarray, w0: np.ndarray) -> dict:
    import torch
    from fairscale.optim import AdaScale

    _, micro, groups, reference, smoothing, momentum, updates = case
    torch.set_default_dtype(torch.float64)
    w = torch.nn.Parameter(torch.tensor(w0))
    sgd = torch.optim.SGD([w], lr=schedule(0.0), momentum=momentum)
    optim = AdaScale(
        sgd,
        world_size=1,
        scale=groups * micro / reference,
        smoothing=smoothing,
        num_gradients_to_accumulate=groups,
    )
    rows, tau = [], 0.0
    for t in range(updates):
        optim.zero_grad()
        for j in range(groups):
            i = t * groups + j
            xb, yb = torch.tensor(x[i]), torch.tensor(y[i])
            loss = 0.5 * ((xb @ w - yb) ** 2).sum(-1).mean() / groups
            loss.backward()
        gain = optim.gain()
        rate = gain * sgd.param_groups[0]["lr"]
        tau += gain
        optim.step()
        sgd.param_groups[0]["lr"] = schedule(tau)
        rows.append([gain, tau, rate, *w.detach().numpy().ravel()])
    optim.unhook()
    return {"rows": np.asarray(rows)}


def run_ours(case: tuple, x: np.ndarray, y: np.ndarray, w0: np.ndarray) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import optax

    import optax_warmup as ow

    _, micro, groups, reference, smoothing, momentum, updates = case
    tx = ow.accumulate(
        ow.adascale(optax.sgd, reference_batch_size=reference, smoothing=smoothing)(
            learning_rate=lambda tau: (
                0.2 * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(tau / 40.0, 1.0)))
            ),
            momentum=momentum or None,
        ),
        batch_size=groups * micro,
        micro_batch_size=micro,
    )

    def loss(w, xb, yb):
        return 0.5 * jnp.mean(jnp.sum((xb @ w - yb) ** 2, -1))

    @jax.jit
    def step(w, state, xb, yb):
        updates, state = tx.update(jax.grad(loss)(w, xb, yb), state, w)
        return optax.apply_updates(w, updates), state

    w = jnp.asarray(w0)
    state = tx.init(w)
    rows = []
    for t in range(updates):
        for j in range(groups):
            i = t * groups + j
            w, state = step(w, state, jnp.asarray(x[i]), jnp.asarray(y[i]))
        rows.append(
            [
                float(ow.current_gain(state)),
                float(ow.adascale_progress(state)),
                float(ow.current_lr(state)),
                *np.asarray(w).ravel(),
            ]
        )
    return {"rows": np.asarray(rows)}


def relative(a: np.ndarray, b: np.ndarray) -> float:
    scale = np.maximum(np.abs(a), np.abs(b))
    scale = np.where(scale == 0, 1.0, scale)
    return float(np.max(np.abs(a - b) / scale))


def main(quick: bool = False) -> dict[str, Any]:
    try:
        import fairscale
        import torch
    except ImportError as error:
        print(f"skipped: {error} (install the bench extra)")
        return {"skipped": str(error)}
    cases = []
    for seed, case in enumerate(CASES):
        if quick:
            case = (*case[:-1], 5)
        name, micro, groups, *_ = case
        updates = case[-1]
        x, y = data(seed, updates, groups, micro)
        w0 = np.random.default_rng(100 + seed).normal(size=(DIM, OUT))
        theirs = run_fairscale(case, x, y, w0)["rows"]
        ours = run_ours(case, x, y, w0)["rows"]
        diffs = {
            "gain": relative(ours[:, 0], theirs[:, 0]),
            "tau": relative(ours[:, 1], theirs[:, 1]),
            "rate": relative(ours[:, 2], theirs[:, 2]),
            "weights": relative(ours[:, 3:], theirs[:, 3:]),
        }
        cases.append(
            {
                "name": name,
                "updates": updates,
                "groups": groups,
                "micro_batch": micro,
                "final_gain": float(theirs[-1, 0]),
                "final_tau": float(theirs[-1, 1]),
                "max_relative_difference": diffs,
            }
        )
    print(
        f"\now.adascale vs fairscale.optim.AdaScale (float64), torch "
        f"{torch.__version__}, fairscale {fairscale.__version__}\n"
    )
    print(
        "| case | updates | final gain | final τ | max rel. diff (gain, τ, rate, w) |"
    )
    print("|---|---:|---:|---:|---|")
    for c in cases:
        d = c["max_relative_difference"]
        print(
            f"| {c['name']} | {c['updates']} | {c['final_gain']:.4f} | "
            f"{c['final_tau']:.3f} | {d['gain']:.1e}, {d['tau']:.1e}, "
            f"{d['rate']:.1e}, {d['weights']:.1e} |"
        )
    versions = {"torch": torch.__version__, "fairscale": fairscale.__version__}
    return {"cases": cases, **versions}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 updates per case")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    result = main(quick=args.quick)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    elif "cases" in result:
        from _common import write_result

        write_result("adascale_fairscale", result)
