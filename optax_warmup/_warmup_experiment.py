"""The warmup experiment behind ``python -m optax_warmup.demo``: its runs.

Goyal et al. 2017's comparison (Table 2a), scaled down: a small 1-D ResNet
(``ow.models.SmallResNet1D``) trained on MNIST-1D in four configurations, each for the
same number of epochs with the learning rate divided by 10 at the same epochs:

1. ``reference``: the small batch n with learning rate η;
2. ``no_warmup``: the large batch kn with the linearly scaled rate kη from step 0;
3. ``constant_warmup``: kn, η for the warmup epochs, then kη;
4. ``gradual_warmup``: kn, η rising linearly to kη over the warmup epochs.

Everything else is the library's recipe: ``ow.goyal_sgd`` (momentum 0.9, weight decay
that skips BatchNorm parameters and biases), ``ow.smoothed_cross_entropy``, zero-γ
initialization, and BatchNorm statistics over groups of n examples inside the large
batch (ghost BatchNorm), as Goyal's workers computed them.

The train step is one ``jax.jit`` function of the public API. It shards the batch over
every device of a ``jax.sharding.Mesh`` (data parallelism): one device on a CPU
process, all of them on a GPU or TPU host. On a CPU host, ``run_all`` runs the
(configuration, seed) runs in parallel processes of one XLA thread each instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import optax_warmup as ow
from optax_warmup import _mnist1d

# name -> (batch: "small" or "large", warmup of ow.goyal_sgd, row of the table)
CONFIGS = {
    "reference": ("small", "none", "small batch n (reference)"),
    "no_warmup": ("large", "none", "kn, no warmup"),
    "constant_warmup": ("large", "constant", "kn, constant warmup"),
    "gradual_warmup": ("large", "gradual", "kn, gradual warmup"),
}
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
FINAL_EPOCHS = 5  # Goyal: a run's error is the median of its last 5 epochs


@dataclasses.dataclass(frozen=True)
class Experiment:
    """The settings shared by every run (see ``--help``)."""

    small_batch: int = 32
    large_batch: int = 1024
    lr: float = 0.1
    epochs: int = 30
    warmup_epochs: float = 5.0
    milestones: tuple[float, ...] = (10.0, 20.0, 27.0)
    weight_decay: float = 1e-4
    momentum: float = 0.9
    label_smoothing: float = 0.1
    widths: tuple[int, ...] = (8, 16, 32)

    def __post_init__(self):  # lists (from JSON, say) become tuples: hashable
        object.__setattr__(self, "milestones", tuple(map(float, self.milestones)))
        object.__setattr__(self, "widths", tuple(map(int, self.widths)))

    def batch_size(self, config: str) -> int:
        return self.small_batch if CONFIGS[config][0] == "small" else self.large_batch

    def _schedule_args(self, config: str) -> dict[str, Any]:
        """The arguments that ``goyal_schedule`` and ``goyal_sgd`` share."""
        return {
            "batch_size": self.batch_size(config),
            "base_lr": self.lr,
            "base_batch_size": self.small_batch,
            "warmup_epochs": self.warmup_epochs,
            "milestones": self.milestones,
            "warmup": CONFIGS[config][1],
        }

    def optimizer(
        self, config: str, steps_per_epoch: int
    ) -> optax.GradientTransformation:
        """``ow.goyal_sgd`` for ``config``: η at batch n, scaled to its batch."""
        return ow.goyal_sgd(
            steps_per_epoch=steps_per_epoch,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            **self._schedule_args(config),
        )

    def schedule(self, config: str, steps_per_epoch: int) -> optax.Schedule:
        """The learning-rate schedule of ``optimizer(config, steps_per_epoch)``."""
        return ow.goyal_schedule(
            steps_per_epoch=steps_per_epoch, **self._schedule_args(config)
        )


def default_milestones(epochs: int) -> tuple[float, ...]:
    """Goyal's decays at epochs 30, 60 and 80 of 90, scaled to ``epochs``.

    >>> default_milestones(90)
    (30.0, 60.0, 80.0)
    >>> default_milestones(30)
    (10.0, 20.0, 27.0)
    """
    return tuple(float(round(epochs * f)) for f in (30 / 90, 60 / 90, 80 / 90))


def final_error(test_errors: Sequence[float]) -> float:
    """A run's final error as Goyal reports it: the median of the last 5 epochs.

    >>> final_error([0.9, 0.5, 0.1, 0.2, 0.3, 0.4, 0.2])
    0.2
    """
    return float(np.median(np.asarray(test_errors[-FINAL_EPOCHS:], np.float64)))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (ddof=1; 0 for a single value).

    >>> mean_std([1.0, 2.0, 3.0])
    (2.0, 1.0)
    """
    values = np.asarray(values, np.float64)
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return float(values.mean()), std


# --- one run ------------------------------------------------------------------


def _mesh_shardings(
    devices: Sequence[jax.Device],
) -> tuple[NamedSharding, NamedSharding]:
    """(replicated, batch-sharded) over ``devices``: data parallelism."""
    mesh = Mesh(np.asarray(devices), ("data",))
    return NamedSharding(mesh, PartitionSpec()), NamedSharding(
        mesh, PartitionSpec("data")
    )


def _build(exp: Experiment, config: str, steps_per_epoch: int, seed: int):
    model = ow.models.SmallResNet1D(
        num_classes=_mnist1d.NUM_CLASSES,
        widths=exp.widths,
        batch_norm_group_size=exp.small_batch,
        rngs=nnx.Rngs(seed),
    )
    model.train()
    train_def, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    model.eval()
    eval_def = nnx.graphdef(model)
    return train_def, eval_def, params, stats, exp.optimizer(config, steps_per_epoch)


_STEPS: dict[Any, tuple[Callable, Callable]] = {}  # compiled once per process


def _steps(exp: Experiment, config: str, steps_per_epoch: int, train_def, eval_def, tx):
    """The jitted train and eval steps of a configuration (shared by its seeds)."""
    key = (exp, config, steps_per_epoch)
    if key in _STEPS:
        return _STEPS[key]
    alpha = exp.label_smoothing

    @jax.jit
    def train_step(params, stats, opt_state, x, y):
        def loss_fn(params, stats):
            model = nnx.merge(train_def, params, stats, copy=True)
            logits = model(x)
            loss = ow.smoothed_cross_entropy(logits, y, alpha).mean()
            return loss, (nnx.state(model, nnx.BatchStat), logits)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (stats, logits)), grads = grad_fn(params, stats)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        error = jnp.mean(jnp.argmax(logits, -1) != y)
        return params, stats, opt_state, loss, error

    @jax.jit
    def errors(params, stats, x, y):
        logits = nnx.merge(eval_def, params, stats, copy=True)(x)
        return jnp.sum(jnp.argmax(logits, -1) != y)

    _STEPS[key] = (train_step, errors)
    return train_step, errors


def train_run(
    exp: Experiment,
    config: str,
    seed: int,
    data: dict[str, np.ndarray],
    on_epoch: Callable[[int, float], None] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
    """Trains one (configuration, seed) and returns its per-epoch curves.

    Args:
      exp: the settings.
      config: a key of ``CONFIGS``.
      seed: seeds the initialization and the order of the examples (the same seed
        gives every configuration the same initial weights).
      data: the arrays of ``_mnist1d.load``.
      on_epoch: called as ``on_epoch(epoch, test_error)`` after each epoch.
      devices: the devices that the batch is sharded over (default: all).

    Returns:
      A dict of per-epoch lists (``train_loss``, ``train_error``: the mean over
      the epoch's batches in training mode; ``test_error``: eval mode at the end of
      the epoch; ``lr``: ``ow.current_lr`` after the last step) and the run's final
      errors. A run whose loss turns NaN stops there (``diverged``).
    """
    start = time.perf_counter()
    batch = exp.batch_size(config)
    x_train, y_train = data["x_train"], data["y_train"]
    steps_per_epoch = len(y_train) // batch
    if steps_per_epoch < 1:
        raise ValueError(f"batch {batch} is larger than the {len(y_train)} examples")
    replicated, sharded = _mesh_shardings(devices or jax.devices())
    if batch % sharded.mesh.size:
        raise ValueError(
            f"batch {batch} does not split over {sharded.mesh.size} devices"
        )
    train_def, eval_def, params, stats, tx = _build(exp, config, steps_per_epoch, seed)
    train_step, errors = _steps(exp, config, steps_per_epoch, train_def, eval_def, tx)
    params, stats = jax.device_put((params, stats), replicated)
    opt_state = jax.device_put(tx.init(params), replicated)
    x_test, y_test = jax.device_put((data["x_test"], data["y_test"]), replicated)

    rng = np.random.default_rng(seed)
    curves: dict[str, list] = {
        k: [] for k in ("train_loss", "train_error", "test_error", "lr")
    }
    diverged = False
    for epoch in range(exp.epochs):
        order = rng.permutation(len(y_train))[: steps_per_epoch * batch]
        losses, errs = [], []
        for idx in order.reshape(steps_per_epoch, batch):
            x, y = jax.device_put((x_train[idx], y_train[idx]), sharded)
            params, stats, opt_state, loss, err = train_step(
                params, stats, opt_state, x, y
            )
            losses.append(loss)
            errs.append(err)
        train_loss = float(np.mean(jax.device_get(losses)))
        test_error = float(errors(params, stats, x_test, y_test)) / len(data["y_test"])
        curves["train_loss"].append(train_loss if np.isfinite(train_loss) else None)
        curves["train_error"].append(float(np.mean(jax.device_get(errs))))
        curves["test_error"].append(test_error)
        curves["lr"].append(float(ow.current_lr(opt_state)))
        if on_epoch is not None:
            on_epoch(epoch, test_error)
        if not np.isfinite(train_loss):  # NaN weights: the rest would be chance
            diverged = True
            break
    return {
        "config": config,
        "seed": seed,
        "batch_size": batch,
        "steps_per_epoch": steps_per_epoch,
        "diverged": diverged,
        "final_test_error": final_error(curves["test_error"]),
        "last_test_error": curves["test_error"][-1],
        "final_train_error": curves["train_error"][-1],
        "seconds": time.perf_counter() - start,
        **curves,
    }


# --- many runs ----------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(data: dict[str, np.ndarray], progress: Any) -> None:
    _WORKER.update(data=data, progress=progress)


def _worker_run(exp: Experiment, config: str, seed: int) -> dict[str, Any]:
    progress = _WORKER["progress"]
    return train_run(
        exp, config, seed, _WORKER["data"], lambda e, err: progress.put((config, err))
    )


def run_all(
    exp: Experiment,
    seeds: Sequence[int],
    data: dict[str, np.ndarray],
    workers: int,
    *,
    show_progress: bool = True,
    worker_env: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Runs every configuration for every seed, with a tqdm bar over the epochs.

    Args:
      exp: the settings.
      seeds: one run per configuration and seed.
      data: the arrays of ``_mnist1d.load``.
      workers: 1 runs everything in this process, one run after another (a GPU or
        TPU host: each step uses every device). More starts that many processes
        (spawned, so no JAX state is forked) of one XLA CPU thread each.
      show_progress: show the progress bar.
      worker_env: environment variables for the worker processes.

    Returns:
      The ``train_run`` results, seed-major in the order of ``CONFIGS``.
    """
    from tqdm.auto import tqdm

    tasks = [(config, seed) for seed in seeds for config in CONFIGS]
    bar = tqdm(total=len(tasks) * exp.epochs, unit="epoch", disable=not show_progress)

    def advance(config: str, error: float) -> None:
        bar.update(1)
        bar.set_postfix_str(f"{config} test error {100 * error:.1f}%")

    try:
        if workers <= 1:
            return [
                train_run(exp, c, s, data, lambda _, err, c=c: advance(c, err))
                for c, s in tasks
            ]
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        progress = ctx.Queue()
        env = dict(worker_env or {})
        env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {ONE_THREAD}".strip()
        with (
            _environ(env),
            ProcessPoolExecutor(
                workers,
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(data, progress),
            ) as pool,
        ):
            futures = [pool.submit(_worker_run, exp, c, s) for c, s in tasks]
            while not all(f.done() for f in futures):
                try:
                    advance(*progress.get(timeout=0.2))
                except queue.Empty:
                    pass
            results = [f.result() for f in futures]
        bar.update(bar.total - bar.n)  # diverged runs stop early
        return results
    finally:
        bar.close()


@contextlib.contextmanager
def _environ(updates: dict[str, str]) -> Iterator[None]:
    """Sets environment variables (inherited by processes started inside)."""
    previous = {key: os.environ.get(key) for key in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
