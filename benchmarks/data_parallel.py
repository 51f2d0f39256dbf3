"""Data parallelism across processes: examples/s of 1 and 2 jax.distributed processes.

Claim: the demo's train step runs across processes (``python -m optax_warmup.demo
--processes N``); this measures what that costs on this machine. For two train
steps, the demo's (``SmallResNet1D`` with ghost BatchNorm and ``ow.goyal_sgd`` on
MNIST-1D-shaped input, through ``optax_warmup.demo.training``) and a ResNet-18 step
(``ow.models.ResNet18``, small 32×32×3 input, 11M parameters), it times one process
with one device against two processes with one device each, on a fixed batch per
process (weak scaling, as Goyal et al. scale: their ~90% from 8 to 256 GPUs), and
reports examples per second of the global batch and the scaling efficiency
``throughput(2) / (2 × throughput(1))``. In the two-process run it also times one
all-reduce of a gradient-sized float32 vector (the sum over processes of one row
each, replicated to both).

Every process runs with one XLA thread (one core each), the CPU collectives go over
gloo through the loopback interface, and the steps are timed as in ``_common``
(first call apart, median of repeats). Each configuration is a fresh set of
processes; each round measures 1 and 2 processes back to back, in an order that
alternates from round to round, so that a loaded spell of the machine hits both.
The efficiency is the median over rounds of each round's efficiency, with a 95%
bootstrap interval over the rounds (``_common``; with few rounds it is wide, and
says so), and the two throughputs are medians over the same rounds. On a machine
with fewer free cores than processes, the two processes share cores and the
efficiency says so.

Run ``python benchmarks/data_parallel.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bootstrap_interval, environment, write_result

ROOT = Path(__file__).resolve().parents[1]
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
MARK = "RESULT "

# Per process: batch, timed steps (quick, full).
STEPS = {
    "demo": {"batch": 128, "repeats": (5, 30)},
    "resnet18": {"batch": (4, 16), "repeats": (2, 5)},
}


def _worker(step: str, quick: bool, port: int, processes: int, index: int) -> None:
    """One process of a measurement: prints ``RESULT {json}`` (process 0)."""
    import jax

    if processes > 1:
        from optax_warmup.demo import distributed

        distributed.connect(
            distributed.Cluster(
                join=True,
                coordinator=f"127.0.0.1:{port}",
                num_processes=processes,
                process_id=index,
                timeout=120,
            )
        )
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import optax_warmup as ow
    from optax_warmup.demo import training, warmup

    spec = STEPS[step]
    batch = (
        spec["batch"]
        if isinstance(spec["batch"], int)
        else spec["batch"][0 if quick else 1]
    )
    repeats = spec["repeats"][0 if quick else 1]
    global_batch = batch * processes
    if step == "demo":
        settings = warmup.Settings()  # n = 32, widths 8, 16, 32
        model = settings.model(0)
        tx = settings.optimizer("gradual_warmup", 100)
        shape, classes = (40, 1), 10
    else:
        model = ow.models.ResNet18(
            num_classes=10, in_features=3, small_input=True, rngs=nnx.Rngs(0)
        )
        tx = ow.goyal_sgd(batch_size=global_batch, steps_per_epoch=100)
        shape, classes = (32, 32, 3), 10
    model.train()
    train_def, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    model.eval()
    train_step, _ = training._steps(None, train_def, nnx.graphdef(model), tx, 0.1)
    mesh = training.data_mesh()
    replicated = NamedSharding(mesh, P())
    sharded = NamedSharding(mesh, P("data"))
    params, stats = training.put_replicated((params, stats), replicated)
    opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(global_batch, *shape)).astype(np.float32)
    y = rng.integers(0, classes, global_batch).astype(np.int32)
    bx, by = training.put_batch((x, y), np.arange(global_batch), sharded)

    state = [params, stats, opt_state]

    def step_once() -> Any:
        p, s, o, loss, _ = train_step(*state, bx, by)
        state[:] = [p, s, o]
        return loss

    start = time.perf_counter()
    jax.block_until_ready(step_once())
    first = time.perf_counter() - start
    jax.block_until_ready(step_once())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step_once())
        times.append(time.perf_counter() - start)
    size = sum(leaf.size for leaf in jax.tree.leaves(params))
    result = {
        "step": step,
        "processes": processes,
        "batch_per_process": batch,
        "global_batch": global_batch,
        "parameters": int(size),
        "first_call_s": first,
        "median_step_s": statistics.median(times),
        "examples_per_s": global_batch / statistics.median(times),
    }
    if processes > 1:  # one all-reduce of a gradient-sized vector
        rows = jax.make_array_from_process_local_data(
            sharded, np.ones((1, size), np.float32), (processes, size)
        )
        reduce = jax.jit(lambda g: jnp.sum(g, 0), out_shardings=replicated)
        jax.block_until_ready(reduce(rows))
        reduces = []
        for _ in range(max(5, repeats)):
            start = time.perf_counter()
            jax.block_until_ready(reduce(rows))
            reduces.append(time.perf_counter() - start)
        result["all_reduce_s"] = statistics.median(reduces)
        result["all_reduce_mb"] = size * 4 / 1e6
    if index == 0:
        print(MARK + json.dumps(result), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(step: str, processes: int, quick: bool) -> dict[str, Any]:
    """Starts ``processes`` fresh processes for ``step``; process 0's result."""
    port = _free_port()
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {ONE_THREAD}".strip()
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH")) if p
    )
    command = [sys.executable, __file__, "--worker", step, str(int(quick)), str(port)]
    procs = [
        subprocess.Popen(
            [*command, str(processes), str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=1800)
            if p.returncode:
                raise RuntimeError(f"{step} over {processes}: {err[-2000:]}")
            outputs.append(out)
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    (line,) = [x for x in outputs[0].splitlines() if x.startswith(MARK)]
    return json.loads(line[len(MARK) :])


def main(quick: bool = False) -> dict[str, Any]:
    rounds = 1 if quick else 3
    results: dict[str, Any] = {}
    table = [
        "| step | params | batch/process | 1 process (ex/s) | 2 processes (ex/s) "
        "| scaling efficiency [95%] | all-reduce of the gradients |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for step in STEPS:
        runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        for r in range(rounds):
            for n in (1, 2) if r % 2 == 0 else (2, 1):
                runs[n].append(measure(step, n, quick))
        one = statistics.median(x["examples_per_s"] for x in runs[1])
        two = statistics.median(x["examples_per_s"] for x in runs[2])
        reduce_s = statistics.median(x["all_reduce_s"] for x in runs[2])
        per_round = [
            b["examples_per_s"] / (2 * a["examples_per_s"])
            for a, b in zip(runs[1], runs[2], strict=True)
        ]
        efficiency = statistics.median(per_round)
        interval = bootstrap_interval(per_round)
        last = runs[2][-1]
        results[step] = {
            "one_process_examples_per_s": one,
            "two_processes_examples_per_s": two,
            "scaling_efficiency": efficiency,
            "scaling_efficiency_interval": interval,
            "all_reduce_s": reduce_s,
            "all_reduce_mb": last["all_reduce_mb"],
            "parameters": last["parameters"],
            "batch_per_process": last["batch_per_process"],
            "runs": runs,
        }
        table.append(
            f"| {step} | {last['parameters'] / 1e6:.2f}M | "
            f"{last['batch_per_process']} | {one:.1f} | {two:.1f} | "
            f"{100 * efficiency:.0f}% [{100 * interval[0]:.0f}%, "
            f"{100 * interval[1]:.0f}%] | {1e3 * reduce_s:.2f} ms "
            f"({last['all_reduce_mb']:.1f} MB) |"
        )
    env = environment()
    print(
        f"jax.distributed on {env['cpu_count']} CPU cores ({env['machine']}), one XLA "
        f"thread per process, gloo over loopback; jax {env['jax']}, optax "
        f"{env['optax']}, flax {env['flax']}"
    )
    print("\n".join(table))
    print(
        f"\nMedians over {rounds} round{'s' * (rounds != 1)} of 1 and 2 processes, "
        "back to back; the efficiency's 95% bootstrap interval is over the rounds "
        "(one round gives none)."
    )
    result = {"quick": quick, "rounds": rounds, **results}
    write_result("data_parallel" + ("-quick" if quick else ""), result)
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        step, quick, port, processes, index = sys.argv[2:7]
        _worker(step, quick == "1", int(port), int(processes), int(index))
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--quick", action="store_true", help="a smoke run")
        main(quick=parser.parse_args().quick)
