"""One training run of a classifier on one device mesh, with per-epoch curves.

The train step is one ``jax.jit`` function of the public API: the model's forward
pass in training mode (ghost BatchNorm updates its statistics), the label-smoothed
cross-entropy ``ow.smoothed_cross_entropy``, its gradient and the optimizer's
update. The batch is sharded over the ``data`` axis of a ``jax.sharding.Mesh``
(data parallelism; XLA all-reduces the gradients), the parameters and the
optimizer state are replicated. The mesh may span processes (``jax.distributed``):
each process then puts only its rows of every batch and of the test set on its
devices, and every number of the recipe (the batch, the steps per epoch) stays
global. The epoch loop, the shuffling and the evaluation are
plain Python around it, so an experiment only chooses the model, the optimizer and
the batch; ``run_result`` makes its result of the curves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import optax_warmup as ow
from optax_warmup.demo import stats
from optax_warmup.demo.experiment import Arrays, OnEpoch, Result

Readout = Callable[[optax.OptState], Any]  # opt_state -> a scalar, once per epoch
DEFAULT_READOUTS: Mapping[str, Readout] = {"lr": ow.current_lr}


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh ``("data",)`` over ``devices`` (default: all of them)."""
    return Mesh(np.asarray(devices or jax.devices()), ("data",))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch (the remainder of each shuffled epoch is dropped)."""
    steps = num_examples // batch_size
    if steps < 1:
        raise ValueError(
            f"batch_size {batch_size} is larger than the {num_examples} examples"
        )
    return steps


_STEPS: dict[Hashable, tuple[Callable, Callable]] = {}  # compiled once per process


def _loss_fn(train_def, label_smoothing: float) -> Callable:
    """The label-smoothed loss of a batch, with the new BatchNorm statistics and the
    logits: ``loss_fn(params, stats, x, y) -> (loss, (stats, logits))``."""

    def loss_fn(params, stats, x, y):
        model = nnx.merge(train_def, params, stats, copy=True)
        logits = model(x)
        loss = ow.smoothed_cross_entropy(logits, y, label_smoothing).mean()
        return loss, (nnx.state(model, nnx.BatchStat), logits)

    return loss_fn


def _errors(eval_def) -> Callable:
    """The jitted count of errors in a weighted batch, and of the examples counted."""

    @jax.jit
    def errors(params, stats, x, y, weight):
        logits = nnx.merge(eval_def, params, stats, copy=True)(x)
        return jnp.sum((jnp.argmax(logits, -1) != y) * weight), jnp.sum(weight)

    return errors


def _steps(
    key: Hashable | None,
    train_def,
    eval_def,
    tx,
    label_smoothing: float,
    noise_scale_group: int | None = None,
) -> tuple[Callable, Callable]:
    """The jitted train and eval steps, shared by every run with the same ``key``."""
    if key is not None and key in _STEPS:
        return _STEPS[key]

    loss_fn = _loss_fn(train_def, label_smoothing)

    @jax.jit
    def train_step(params, stats, opt_state, x, y):
        if noise_scale_group is None:
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (loss, (stats, logits)), grads = grad_fn(params, stats, x, y)
            updates, opt_state = tx.update(grads, opt_state, params)
        else:  # one gradient per group of the batch: the noise scale's two norms
            grad_fn = ow.value_and_grad_by_group(
                loss_fn,
                group_size=noise_scale_group,
                has_aux=True,
                batch_argnums=(2, 3),
            )
            (loss, (stats, logits)), grads, small, big = grad_fn(params, stats, x, y)
            stats = jax.tree.map(lambda s: s.mean(0), stats)
            logits = logits.reshape(-1, logits.shape[-1])
            updates, opt_state = tx.update(
                grads, opt_state, params, small_sq_norm=small, big_sq_norm=big
            )
        params = optax.apply_updates(params, updates)
        error = jnp.mean(jnp.argmax(logits, -1) != y)
        return params, stats, opt_state, loss, error

    errors = _errors(eval_def)
    if key is not None:
        _STEPS[key] = (train_step, errors)
    return train_step, errors


def put_replicated(tree: Any, sharding: NamedSharding) -> Any:
    """Host values onto every device of ``sharding``'s mesh, in every process.

    Each process gives the same values (the same seed gives the same model); the
    copy goes through host memory, so it works on a mesh that spans processes.
    """

    def put(leaf: Any) -> jax.Array:
        host = np.asarray(jax.device_get(leaf))
        return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

    return jax.tree.map(put, tree)


def put_batch(
    arrays: Sequence[np.ndarray], idx: np.ndarray, sharding: NamedSharding
) -> list[jax.Array]:
    """The global batch ``a[idx]`` of each array, sharded over ``sharding``.

    This process reads only its own rows of the batch (``process_rows``) and puts
    them on its devices (``jax.make_array_from_process_local_data``): no process
    holds the whole batch.
    """
    from optax_warmup.demo.distributed import process_rows

    mine = idx[process_rows(sharding, len(idx))]
    return [
        jax.make_array_from_process_local_data(
            sharding, a[mine], (len(idx), *a.shape[1:])
        )
        for a in arrays
    ]


def put_test_set(
    x: np.ndarray, y: np.ndarray, sharding: NamedSharding
) -> list[jax.Array]:
    """The test set sharded like a batch, padded to a multiple of the mesh with
    examples of weight 0, and the weights: each example counts once."""
    pad = -len(y) % sharding.mesh.size
    weight = np.concatenate([np.ones(len(y), np.int32), np.zeros(pad, np.int32)])
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    y = np.concatenate([y, np.zeros(pad, y.dtype)])
    return put_batch([x, y, weight], np.arange(len(y)), sharding)


def train_classifier(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    data: Arrays,
    *,
    batch_size: int,
    epochs: int,
    seed: int,
    label_smoothing: float = 0.0,
    mesh: Mesh | None = None,
    on_epoch: OnEpoch | None = None,
    readouts: Mapping[str, Readout] = DEFAULT_READOUTS,
    step_key: Hashable | None = None,
    noise_scale_group: int | None = None,
) -> dict[str, Any]:
    """Trains ``model`` with ``tx`` for ``epochs`` and returns its per-epoch curves.

    Args:
      model: a freshly initialized ``nnx`` classifier (its weights are not changed:
        the run trains a copy of its state).
      tx: the optimizer, built for ``steps_per_epoch(len(y_train), batch_size)``
        updates per epoch.
      data: ``{"x_train", "y_train", "x_test", "y_test"}`` host arrays.
      batch_size: the global batch of one update; a multiple of the mesh size.
      epochs: passes over the shuffled training set.
      seed: seeds the order of the examples (``np.random.default_rng(seed)``).
      label_smoothing: α of ``ow.smoothed_cross_entropy``.
      mesh: the devices; the batch is split over its ``data`` axis (default: a
        mesh over every device).
      on_epoch: called as ``on_epoch(epoch, test_error)`` after each epoch.
      readouts: per-epoch values read from the optimizer state after the epoch's
        last update, by name (default: ``ow.current_lr`` as ``lr``).
      step_key: a hashable key that determines the model's structure, ``tx`` and
        ``label_smoothing``; runs with the same key reuse the compiled steps
        (None: compile afresh).

    Returns:
      ``steps_per_epoch``, ``diverged``, ``seconds`` and per-epoch lists:
      ``train_loss`` and ``train_error`` (the mean over the epoch's batches in
      training mode; a non-finite loss is None), ``test_error`` (eval mode after
      the epoch) and each readout. A run whose loss turns NaN or infinite stops
      after that epoch (``diverged``): the rest would be chance.
    """
    start = time.perf_counter()
    x_train, y_train = data["x_train"], data["y_train"]
    steps = steps_per_epoch(len(y_train), batch_size)
    mesh = mesh or data_mesh()
    if batch_size % mesh.size:
        raise ValueError(
            f"batch_size {batch_size} does not split over {mesh.size} devices"
        )
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("data"))

    model.train()
    train_def, *states = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, stats = states
    model.eval()
    eval_def = nnx.graphdef(model)
    train_step, errors = _steps(
        step_key, train_def, eval_def, tx, label_smoothing, noise_scale_group
    )
    params, stats = put_replicated((params, stats), replicated)
    opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
    test_set = put_test_set(data["x_test"], data["y_test"], sharded)

    rng = np.random.default_rng(seed)
    curves: dict[str, list] = {
        k: [] for k in ("train_loss", "train_error", "test_error", *readouts)
    }
    diverged = False
    for epoch in range(epochs):
        order = rng.permutation(len(y_train))[: steps * batch_size]
        losses, errs = [], []
        for idx in order.reshape(steps, batch_size):
            x, y = put_batch((x_train, y_train), idx, sharded)
            params, stats, opt_state, loss, err = train_step(
                params, stats, opt_state, x, y
            )
            losses.append(loss)
            errs.append(err)
        train_loss = float(np.mean(jax.device_get(losses)))
        wrong, counted = errors(params, stats, *test_set)
        if int(counted) != len(data["y_test"]):
            raise RuntimeError(f"evaluated {int(counted)} test examples")
        test_error = float(wrong) / len(data["y_test"])
        curves["train_loss"].append(train_loss if np.isfinite(train_loss) else None)
        curves["train_error"].append(float(np.mean(jax.device_get(errs))))
        curves["test_error"].append(test_error)
        for name, read in readouts.items():
            curves[name].append(float(read(opt_state)))
        if on_epoch is not None:
            on_epoch(epoch, test_error)
        if not np.isfinite(train_loss):
            diverged = True
            break
    return {
        "steps_per_epoch": steps,
        "diverged": diverged,
        "seconds": time.perf_counter() - start,
        **curves,
    }


def run_result(curves: dict[str, Any], **run: Any) -> Result:
    """One run's result: what it was, its final errors, then its curves.

    Args:
      curves: what ``train_classifier`` returned (its ``steps_per_epoch``,
        ``diverged`` and ``seconds`` are moved to the front).
      **run: what the run was (``config``, ``seed``, ``batch_size``, ...), first.

    Returns:
      ``run``, then ``steps_per_epoch``, ``diverged``, ``final_test_error``
      (Goyal's median of the last 5 epochs, ``stats.final_error``),
      ``last_test_error``, ``final_train_error`` (the last epoch's), ``seconds``
      and the per-epoch curves.
    """
    curves = dict(curves)
    return {
        **run,
        "steps_per_epoch": curves.pop("steps_per_epoch"),
        "diverged": curves.pop("diverged"),
        "final_test_error": stats.final_error(curves["test_error"]),
        "last_test_error": curves["test_error"][-1],
        "final_train_error": curves["train_error"][-1],
        "seconds": curves.pop("seconds"),
        **curves,
    }


# --- a batch that changes: micro-batches through ``ow.accumulate`` -------------------

Controller = Callable[[optax.OptState], jax.Array]  # opt_state -> the next batch
Progress = Callable[[Mapping[str, float], int], float]  # (reads, n_train) -> epochs


def examples_progress(reads: Mapping[str, float], n_train: int) -> float:
    """A run's progress in epochs of examples: the samples of its updates / N."""
    return reads["consumed"] / n_train


_MICRO_STEPS: dict[Hashable, tuple[Callable, Callable]] = {}  # compiled once


def _micro_steps(
    key: Hashable | None,
    train_def,
    eval_def,
    tx,
    label_smoothing: float,
    controller: Controller | None,
    reads: Mapping[str, Readout],
) -> tuple[Callable, Callable]:
    """The jitted micro-step and eval step, shared by every run with ``key``."""
    if key is not None and key in _MICRO_STEPS:
        return _MICRO_STEPS[key]

    loss_fn = _loss_fn(train_def, label_smoothing)

    @jax.jit
    def micro_step(params, stats, opt_state, x, y):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (stats, logits)), grads = grad_fn(params, stats, x, y)
        extra = {} if controller is None else {"batch_size": controller(opt_state)}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        params = optax.apply_updates(params, updates)
        error = jnp.mean(jnp.argmax(logits, -1) != y)
        status = {
            "micro_step": opt_state.micro_step,
            "consumed": opt_state.consumed_samples,
            "loss": loss,
            "error": error,
            **{name: read(opt_state) for name, read in reads.items()},
        }
        return params, stats, opt_state, status

    errors = _errors(eval_def)
    if key is not None:
        _MICRO_STEPS[key] = (micro_step, errors)
    return micro_step, errors


def train_accumulated(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    data: Arrays,
    *,
    micro_batch_size: int,
    epochs: int,
    seed: int,
    label_smoothing: float = 0.0,
    controller: Controller | None = None,
    progress: Progress = examples_progress,
    evals_per_epoch: int = 8,
    reads: Mapping[str, Readout] | None = None,
    sums: Sequence[str] = (),
    mesh: Mesh | None = None,
    on_epoch: OnEpoch | None = None,
    step_key: Hashable | None = None,
) -> dict[str, Any]:
    """Trains ``model`` one micro-batch at a time through ``tx = ow.accumulate(...)``.

    The jitted step sees ``micro_batch_size`` examples (one compilation for every
    batch); ``tx``, an ``ow.accumulate``, decides how many micro-batches make an
    update (a schedule of the samples consumed, or ``controller(opt_state)``, the
    batch passed to its ``update`` and read on the first micro-batch of each
    update). The examples stream through one shuffled permutation per epoch
    (``np.random.default_rng(seed)``), an update may straddle two epochs, and the
    remainder of each epoch below a micro-batch is dropped. BatchNorm statistics
    are updated at every micro-step (the ghost BatchNorm group is the micro-batch).

    Two evaluations of the whole test set (eval mode, the parameters of the last
    update):

    - the **curve**: after the first update that completes each
      ``1/evals_per_epoch`` of an epoch of examples: the updates and examples so
      far, the batch of that update, the test error and each of ``reads`` (as of
      that update), and, for each
      name of ``sums``, the sum of that read over the updates since the previous
      point (per-update estimates summed over the stretch);
    - the **epochs**: each time ``progress`` passes a whole number of epochs (the
      examples by default; AdaScale's scale-invariant iterations, say), until it
      reaches ``epochs``: the run then stops. ``on_epoch`` is called then.

    Args:
      model: a freshly initialized ``nnx`` classifier (not changed).
      tx: an ``ow.accumulate`` optimizer with ``micro_batch_size``.
      data: ``{"x_train", "y_train", "x_test", "y_test"}`` host arrays.
      micro_batch_size: the examples of one step (a multiple of the mesh size).
      epochs: the run's length in ``progress``'s epochs.
      seed: seeds the order of the examples.
      label_smoothing: α of ``ow.smoothed_cross_entropy``.
      controller: ``controller(opt_state) -> batch``, inside the jitted step, or
        None (``tx``'s own batch).
      progress: ``progress(reads, n_train) -> epochs`` after each update, from
        the step's reads (``consumed`` and ``reads``).
      evals_per_epoch: points of the curve per epoch of examples.
      reads: scalars read from the optimizer state inside the step, by name.
      sums: names of ``reads`` summed per stretch of the curve.
      mesh: the devices (default: all).
      on_epoch: ``on_epoch(epoch, test_error)`` at each whole epoch of progress.
      step_key: a key that determines the model's structure, ``tx``,
        ``label_smoothing``, ``controller`` and ``reads``: runs with the same key
        share the compiled steps (None: compile afresh).

    Returns:
      ``updates``, ``examples``, ``diverged``, ``seconds``, ``curve`` (a dict of
      lists: ``updates``, ``examples``, ``batch``, ``test_error``, each read, each
      ``<name>_sum``) and per-epoch lists ``train_loss``, ``train_error`` (means
      over the epoch's micro-batches), ``test_error``, ``epoch_updates`` and
      ``epoch_examples``. A run whose loss turns non-finite stops at the next
      epoch of progress (``diverged``).
    """
    start = time.perf_counter()
    reads = dict(reads or {})
    x_train, y_train = data["x_train"], data["y_train"]
    n_train = len(y_train)
    per_epoch = steps_per_epoch(n_train, micro_batch_size)
    mesh = mesh or data_mesh()
    if micro_batch_size % mesh.size:
        raise ValueError(
            f"micro_batch_size {micro_batch_size} does not split over {mesh.size} "
            "devices"
        )
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    model.train()
    train_def, *states = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, stats = states
    model.eval()
    eval_def = nnx.graphdef(model)
    micro_step, errors = _micro_steps(
        step_key, train_def, eval_def, tx, label_smoothing, controller, reads
    )
    params, stats = put_replicated((params, stats), replicated)
    opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
    test_set = put_test_set(data["x_test"], data["y_test"], sharded)
    n_test = len(data["y_test"])

    def test_error() -> float:
        wrong, counted = errors(params, stats, *test_set)
        if int(counted) != n_test:
            raise RuntimeError(f"evaluated {int(counted)} test examples")
        return float(wrong) / n_test

    rng = np.random.default_rng(seed)
    curve: dict[str, list] = {
        k: [] for k in ("updates", "examples", "batch", "test_error", *reads)
    }
    curve.update({f"{name}_sum": [] for name in sums})
    stretch = dict.fromkeys(sums, 0.0)
    per_epoch_keys = ("train_loss", "train_error", "test_error")
    epoch_curves: dict[str, list] = {
        k: [] for k in (*per_epoch_keys, "epoch_updates", "epoch_examples")
    }
    losses: list[float] = []
    errs: list[float] = []
    updates, consumed, diverged = 0, 0, False
    next_point = 1
    epoch = 0
    batches: Iterator[np.ndarray] = iter(())
    while epoch < epochs:
        idx = next(batches, None)
        if idx is None:
            order = rng.permutation(n_train)[: per_epoch * micro_batch_size]
            batches = iter(order.reshape(per_epoch, micro_batch_size))
            idx = next(batches)
        x, y = put_batch((x_train, y_train), idx, sharded)
        params, stats, opt_state, status = micro_step(params, stats, opt_state, x, y)
        status = jax.device_get(status)
        losses.append(float(status["loss"]))
        errs.append(float(status["error"]))
        if int(status["micro_step"]) != 0:  # still accumulating the update
            continue
        updates += 1
        batch = int(status["consumed"]) - consumed
        consumed = int(status["consumed"])
        values = {name: float(status[name]) for name in reads}
        for name in sums:
            stretch[name] += values[name]
        if consumed * evals_per_epoch >= next_point * n_train:
            error = test_error()
            curve["updates"].append(updates)
            curve["examples"].append(consumed)
            curve["batch"].append(batch)
            curve["test_error"].append(error)
            for name in reads:
                curve[name].append(values[name])
            for name in sums:
                curve[f"{name}_sum"].append(stretch[name])
                stretch[name] = 0.0
            while consumed * evals_per_epoch >= next_point * n_train:
                next_point += 1
        reached = progress({"consumed": consumed, **values}, n_train)
        # A NaN loss, or a NaN progress (AdaScale's clock after a NaN gain), ends
        # the run as diverged rather than training on without an epoch ever ending.
        finite = bool(np.isfinite(losses).all()) and bool(np.isfinite(reached))
        if reached < epoch + 1 and finite:
            continue
        while reached >= epoch + 1 or (not finite and epoch < epochs):
            error = test_error()
            train_loss = float(np.mean(losses))
            epoch_curves["train_loss"].append(
                train_loss if np.isfinite(train_loss) else None
            )
            epoch_curves["train_error"].append(float(np.mean(errs)))
            epoch_curves["test_error"].append(error)
            epoch_curves["epoch_updates"].append(updates)
            epoch_curves["epoch_examples"].append(consumed)
            losses, errs = [], []
            if on_epoch is not None:
                on_epoch(epoch, error)
            epoch += 1
            if not finite:
                diverged = True
                break
            if epoch >= epochs:
                break
        if diverged:
            break
    return {
        "updates": updates,
        "examples": consumed,
        "diverged": diverged,
        "seconds": time.perf_counter() - start,
        "curve": curve,
        **epoch_curves,
    }
