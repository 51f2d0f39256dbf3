"""Gradient accumulation into a batch that may change, with one compiled micro-step.

``accumulate`` wraps an optimizer so that its ``update`` is called once per
micro-batch of a fixed shape: the jitted step compiles once, and the batch, an int or
a schedule of the samples consumed, decides only how many micro-batches make an
update. It hands the inner optimizer the mean gradient, the two squared norms of the
gradient noise scale (free: the micro-gradients are already there), the two batch
sizes and the samples consumed, as extra arguments.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_warmup._batch_schedules import as_batch_schedule, check_batch_schedule
from optax_warmup._tree_paths import flatten, unwrap
from optax_warmup._validation import check_int

# The extra arguments that accumulate passes to the inner optimizer's update.
HANDED_ON = ("small_sq_norm", "big_sq_norm", "b_small", "b_big", "consumed_samples")


class AccumulateState(NamedTuple):
    """State of ``accumulate``."""

    micro_step: jax.Array  # int32 scalar: micro-batches of the current batch so far.
    batch_size: jax.Array  # int32 scalar: the batch being accumulated (b_big).
    consumed_samples: jax.Array  # int32 (int64 with x64): samples of the updates.
    mean_grads: optax.Updates  # the running mean of the micro-gradients.
    sq_norm_sum: jax.Array  # scalar: Σ of the micro-gradients' |g|² so far.
    inner_state: optax.OptState


def _sq_norm(tree: Any, dtype: Any) -> jax.Array:
    """Σ over every leaf of x², in ``dtype``."""
    total = jnp.zeros([], dtype)
    for leaf in jax.tree.leaves(tree):
        wide = leaf.astype(dtype)
        total = total + jnp.sum(wide * wide)
    return total


def _add_saturating(count: jax.Array, n: jax.Array) -> jax.Array:
    """``count + n`` for ``n >= 0`` (a negative ``n`` adds nothing), saturating."""
    top = jnp.iinfo(count.dtype).max
    n = jnp.maximum(n, 0).astype(count.dtype)
    return jnp.where(count > top - n, top, count + n).astype(count.dtype)


def _count_dtype() -> Any:
    """int32, or int64 when ``jax_enable_x64`` is on (samples past 2**31)."""
    return jnp.int64 if jax.config.read("jax_enable_x64") else jnp.int32


def accumulate(
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int | Any,
    micro_batch_size: int,
    sq_norms: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Accumulates micro-batch gradients into a batch that may change during training.

    Call ``update`` once per micro-batch of ``micro_batch_size`` examples (a fixed
    shape, so a jitted step compiles once). With ``b`` the current batch and
    ``G = b / micro_batch_size`` its micro-batches, the ``G`` gradients
    :math:`g_1, \dots, g_G` are averaged; on the last one the inner optimizer
    receives their mean :math:`\bar g` and, as extra arguments,

    - ``small_sq_norm`` :math:`= \frac{1}{G}\sum_j |g_j|^2` and
      ``big_sq_norm`` :math:`= |\bar g|^2`, McCandlish et al.'s two-batch estimate
      (their appendix A.1) at no extra backward pass (only with ``sq_norms``);
    - ``b_small`` (the micro-batch) and ``b_big`` (the batch ``b``), int32;
    - ``consumed_samples``, the samples of the updates before this one (int32,
      int64 with x64);

    and the extra arguments given with that last micro-batch (``value=`` for a
    plateau schedule, say). Its updates are returned; on the other micro-batches
    the updates are zeros and the inner optimizer does not run (``lax.cond``), as
    ``optax.MultiSteps`` returns zeros (which runs it every time and masks). With
    a constant batch it equals ``optax.MultiSteps(optimizer, b //
    micro_batch_size)`` update for update: the same running mean, kept in float32
    (float64 for float64 parameters, which MultiSteps rounds to float32), cast to
    the gradients' dtype.

    The batch is decided on the first micro-batch of each update, from the samples
    consumed by the updates before (as Megatron-LM does): ``batch_size(consumed)``
    for a schedule (``ow.rampup_batch_size``, ``ow.step_batch_size`` or any
    function of an int32 count), or ``update(..., batch_size=b)`` to decide it in
    the step (a controller, such as a batch that follows the noise scale; it is
    read on the first micro-batch of each update and ignored on the others).
    ``ow.current_batch_size(state)`` reads the batch being accumulated and
    ``ow.consumed_samples(state)`` the samples so far.

    Edge cases: a batch of one micro-batch updates at every call (``G = 1``, with
    ``small_sq_norm == big_sq_norm``: no noise-scale estimate, which
    ``track_noise_scale`` and ``adascale`` skip). Under ``jit`` a batch that the
    micro-batch does not divide, or one < 1, cannot raise: its update is NaN (the
    mean gradient is NaN), never a silently resized batch; a negative batch adds no
    samples. The consumed samples are an int32 that saturates at 2**31 - 1 (about
    2.1e9 samples: from there a schedule of samples stops moving); with
    ``jax_enable_x64`` on they are an int64. A run of more samples (an LLM run of
    trillions of tokens in sequences of 4096) needs x64.

    Args:
      optimizer: the inner optimizer; any ``optax.GradientTransformation``.
      batch_size: the batch of one update, an int, or a schedule
        ``consumed_samples -> batch`` (every batch a multiple of
        ``micro_batch_size``).
      micro_batch_size: the examples of one ``update`` call (an integer >= 1).
      sq_norms: hand on ``small_sq_norm`` and ``big_sq_norm`` (one more pass over
        the gradients per micro-batch).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state ``AccumulateState``.

    Raises:
      ValueError: ``micro_batch_size`` is not an integer >= 1, or a batch that
        ``batch_size`` can return (an int, or every value of
        ``rampup_batch_size``/``step_batch_size``) is not a multiple of it; the
        message names the batch.
      TypeError: ``micro_batch_size`` is not an integer; at ``update``, an extra
        argument named as one that ``accumulate`` hands on, or a ``batch_size=``
        that is not an integer scalar.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optax_warmup as ow
      >>> tx = ow.accumulate(optax.sgd(1.0), batch_size=ow.step_batch_size(
      ...     {0: 2, 4: 4}), micro_batch_size=1)
      >>> state = tx.init({"w": jnp.zeros(())})
      >>> for g in [1.0, 3.0, 1.0, 1.0, 2.0, 2.0, 2.0, 6.0]:
      ...     updates, state = tx.update({"w": jnp.asarray(g)}, state)
      ...     print(float(updates["w"]), int(ow.consumed_samples(state)))
      0.0 0
      -2.0 2
      0.0 2
      -1.0 4
      0.0 4
      0.0 4
      0.0 4
      -3.0 8

    References:
      McCandlish et al. 2018, An Empirical Model of Large-Batch Training,
      arXiv:1812.06162, appendix A.1; Shoeybi et al. 2019, Megatron-LM,
      arXiv:1909.08053 (batch ramp-up by consumed samples).
    """
    if isinstance(micro_batch_size, bool) or not isinstance(
        micro_batch_size, int | np.integer
    ):
        raise TypeError(
            f"micro_batch_size must be an integer, got {micro_batch_size!r}"
        )
    check_int("micro_batch_size", micro_batch_size, low=1)
    micro_batch_size = int(micro_batch_size)
    if not callable(batch_size):
        check_int("batch_size", batch_size, low=1)
        batch_size = int(batch_size)
    check_batch_schedule(batch_size, micro_batch_size)
    schedule = as_batch_schedule(batch_size)
    inner = optax.with_extra_args_support(optimizer)
    micro = jnp.int32(micro_batch_size)

    def batch_of(consumed: jax.Array) -> jax.Array:
        return jnp.asarray(schedule(consumed), jnp.int32)

    def init_fn(params: optax.Params) -> AccumulateState:
        consumed = jnp.zeros([], _count_dtype())
        dtype = jnp.promote_types(optax.tree.dtype(params, "highest"), jnp.float32)
        return AccumulateState(
            micro_step=jnp.zeros([], jnp.int32),
            batch_size=batch_of(consumed),
            consumed_samples=consumed,
            mean_grads=optax.tree.zeros_like(params, dtype=dtype),
            sq_norm_sum=jnp.zeros([], dtype),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, *, batch_size=None, **extra_args):
        clash = sorted(set(extra_args) & set(HANDED_ON))
        if clash:
            raise TypeError(
                f"accumulate hands {', '.join(clash)} to the inner optimizer itself; "
                "do not pass them to its update"
            )
        first = state.micro_step == 0
        batch = state.batch_size
        if batch_size is not None:
            chosen = jnp.asarray(batch_size)
            if not jnp.issubdtype(chosen.dtype, jnp.integer) or chosen.ndim:
                raise TypeError(
                    "update's batch_size must be an integer scalar (a float would be "
                    f"truncated), got {batch_size!r}"
                )
            batch = jnp.where(first, chosen.astype(jnp.int32), batch)
        groups = batch // micro
        valid = (batch >= micro) & (batch % micro == 0)
        n = state.micro_step
        # Welford's running mean, as optax.MultiSteps keeps it (bit for bit).
        mean = jax.tree.map(
            lambda g, acc: acc + (g - acc) / (n + 1), updates, state.mean_grads
        )
        dtype = state.sq_norm_sum.dtype
        sq_sum = state.sq_norm_sum + _sq_norm(updates, dtype) if sq_norms else None
        emit = n + 1 >= groups

        def apply(mean, sq_sum, inner_state):
            grads = optax.tree.cast_like(mean, updates)
            grads = jax.tree.map(lambda g: jnp.where(valid, g, jnp.nan), grads)
            handed: dict[str, Any] = {
                "b_small": micro,
                "b_big": batch,
                "consumed_samples": state.consumed_samples,
            }
            if sq_norms:
                handed["small_sq_norm"] = sq_sum / jnp.maximum(groups, 1)
                handed["big_sq_norm"] = _sq_norm(mean, dtype)
            return inner.update(grads, inner_state, params, **handed, **extra_args)

        def skipped(mean, sq_sum, inner_state):
            shapes, _ = jax.eval_shape(apply, mean, sq_sum, inner_state)
            return optax.tree.zeros_like(shapes), inner_state

        # Only the inner update sits in the cond; the counters and the running
        # sums move with jnp.where, fused with the sums themselves.
        new_updates, inner_state = jax.lax.cond(
            emit, apply, skipped, mean, sq_sum, state.inner_state
        )
        consumed = jnp.where(
            emit,
            _add_saturating(state.consumed_samples, batch),
            state.consumed_samples,
        )
        new_state = AccumulateState(
            micro_step=jnp.where(emit, 0, n + 1).astype(jnp.int32),
            batch_size=jnp.where(emit, batch_of(consumed), batch),
            consumed_samples=consumed,
            mean_grads=jax.tree.map(lambda m: jnp.where(emit, 0, m), mean),
            sq_norm_sum=(
                state.sq_norm_sum if sq_sum is None else jnp.where(emit, 0, sq_sum)
            ),
            inner_state=inner_state,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find(opt_state: Any, reader: str) -> AccumulateState:
    if not isinstance(opt_state, tuple) and hasattr(opt_state, "opt_state"):
        opt_state = opt_state.opt_state
    leaves, _ = flatten(opt_state, is_leaf=lambda x: isinstance(x, AccumulateState))
    found = [(p, s) for p, s in leaves if isinstance(s, AccumulateState)]
    if not found:
        raise ValueError(
            f"{reader} found no AccumulateState in opt_state: wrap the optimizer in "
            "ow.accumulate(optimizer, batch_size=..., micro_batch_size=...)"
        )
    if len(found) > 1:
        where = ", ".join(path or "<root>" for path, _ in found)
        raise ValueError(
            f"{reader} found {len(found)} AccumulateStates in opt_state, at {where}; "
            "pass the sub-state of the one you mean"
        )
    return found[0][1]


def consumed_samples(opt_state: Any) -> jax.Array:
    """The samples consumed by the updates applied so far, read from the state.

    Looks through any nesting of optax states (``optax.chain``, ``nnx.Optimizer``
    and its wrappers, a ``TrainState``) for the one ``AccumulateState`` of
    ``ow.accumulate``. Micro-batches of an update still being accumulated are not
    counted: it is the count that ``batch_size`` schedules and rates of samples
    read.

    Args:
      opt_state: an optax state, or an object with an ``opt_state`` attribute.

    Returns:
      An int32 scalar (saturating at 2**31 - 1), an int64 with ``jax_enable_x64``.

    Raises:
      ValueError: no ``AccumulateState``, or more than one (the message lists where).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optax_warmup as ow
      >>> tx = ow.accumulate(optax.sgd(0.1), batch_size=4, micro_batch_size=2)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> for _ in range(3):
      ...     _, state = tx.update({"w": jnp.ones(2)}, state)
      >>> int(ow.consumed_samples(state)), int(ow.current_batch_size(state))
      (4, 4)
    """
    return unwrap(_find(opt_state, "consumed_samples").consumed_samples)


def current_batch_size(opt_state: Any) -> jax.Array:
    """The batch now being accumulated (the next update's), read from the state.

    Right after ``init`` it is the first batch; right after an update, the next
    one's, from the samples consumed so far. A batch passed as
    ``update(..., batch_size=b)`` shows from its first micro-batch on.

    Args:
      opt_state: an optax state, or an object with an ``opt_state`` attribute.

    Returns:
      An int32 scalar.

    Raises:
      ValueError: no ``AccumulateState``, or more than one (the message lists where).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optax_warmup as ow
      >>> tx = ow.accumulate(optax.sgd(0.1), micro_batch_size=32,
      ...                    batch_size=ow.rampup_batch_size(32, 32, 64, 96))
      >>> int(ow.current_batch_size(tx.init({"w": jnp.zeros(2)})))
      32
    """
    return unwrap(_find(opt_state, "current_batch_size").batch_size)
