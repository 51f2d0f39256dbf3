"""Batch-size schedules: the global batch as a function of the samples consumed so far.

Megatron-LM grows the batch by counting samples, not updates: ``--rampup-batch-size
START INCREMENT SAMPLES`` adds ``INCREMENT`` every ``SAMPLES / n`` samples, and its
step schedule switches batch sizes at given sample counts. Here both are tables of
integer boundaries, computed exactly in Python when the schedule is made, and one
evaluation: the value of the last boundary at or below the consumed samples. Python
integers give Python integers (exact at any size); arrays, traced ones included,
are looked up with ``jnp.searchsorted`` in integer arithmetic, so no float division
lands one ulp short of a boundary.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from optax_warmup._validation import is_traced


def _check_positive_int(name: str, value: Any, *, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


class BatchSizeSchedule:
    """``consumed_samples -> batch size``: the value of the last boundary reached.

    ``boundaries[0] == 0`` and the boundaries do not decrease; ``batch_sizes[i]``
    holds from ``boundaries[i]`` (included) to the next boundary (excluded). Made by
    ``rampup_batch_size`` and ``step_batch_size``; the constructor checks those rules
    (a ``ValueError`` or ``TypeError`` naming the entry).

    Example:
      >>> import optax_warmup as ow
      >>> schedule = ow.BatchSizeSchedule([0, 100], [32, 64])
      >>> schedule(99), schedule(100)
      (32, 64)
    """

    def __init__(self, boundaries: Sequence[int], batch_sizes: Sequence[int]):
        self.boundaries = tuple(
            _check_positive_int(f"boundaries[{i}]", b, low=0)
            for i, b in enumerate(boundaries)
        )
        self._values = tuple(
            _check_positive_int(f"batch_sizes[{i}]", v)
            for i, v in enumerate(batch_sizes)
        )
        if len(self.boundaries) != len(self._values) or not self.boundaries:
            raise ValueError(
                "boundaries and batch_sizes must be two non-empty sequences of one "
                f"length, got {len(self.boundaries)} and {len(self._values)}"
            )
        if self.boundaries[0] != 0:
            raise ValueError(
                f"boundaries must start at 0 samples, got boundaries[0]="
                f"{self.boundaries[0]}"
            )
        if any(
            b > c
            for b, c in zip(self.boundaries[:-1], self.boundaries[1:], strict=True)
        ):
            raise ValueError(
                f"boundaries must not decrease, got {list(self.boundaries)}"
            )

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """Every batch size the schedule can return, in the order it returns them."""
        return tuple(dict.fromkeys(self._values))

    def __repr__(self) -> str:
        pairs = ", ".join(
            f"{b}: {v}" for b, v in zip(self.boundaries, self._values, strict=True)
        )
        return f"{type(self).__name__}({{{pairs}}})"

    def __call__(self, consumed_samples: ArrayLike) -> Any:
        if isinstance(consumed_samples, bool):
            raise TypeError(
                f"consumed_samples must be an integer, got {consumed_samples!r}"
            )
        if isinstance(consumed_samples, int | np.integer):
            if consumed_samples < 0:
                raise ValueError(
                    f"consumed_samples must be >= 0, got {consumed_samples!r}"
                )
            i = bisect.bisect_right(self.boundaries, int(consumed_samples)) - 1
            return self._values[i]
        try:
            consumed = jnp.asarray(consumed_samples)
        except TypeError as error:
            raise TypeError(
                f"consumed_samples must be an integer, got {consumed_samples!r}"
            ) from error
        if not jnp.issubdtype(consumed.dtype, jnp.integer):
            raise TypeError(
                "consumed_samples must be integers (a float count is inexact past "
                f"2**24), got dtype {consumed.dtype}"
            )
        if not is_traced(consumed_samples) and bool(jnp.any(consumed < 0)):
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples!r}")
        # Boundaries past the dtype's range can never be reached by a count of that
        # dtype: clip them to its maximum (reached only by a saturated counter).
        top = int(jnp.iinfo(consumed.dtype).max)
        clipped = [min(b, top) for b in self.boundaries]
        boundaries = jnp.asarray(clipped, consumed.dtype)
        values = jnp.asarray(self._values, jnp.int32)
        index = jnp.searchsorted(boundaries, consumed, side="right") - 1
        # A negative count (under jit, where it cannot raise) gives batch 0, which
        # ``ow.accumulate`` turns into NaN updates rather than a plausible batch.
        return jnp.where(index >= 0, values[jnp.maximum(index, 0)], 0)


def rampup_batch_size(
    start_batch_size: int,
    batch_size_increment: int,
    rampup_samples: int,
    global_batch_size: int,
) -> BatchSizeSchedule:
    """Megatron-LM's batch-size ramp: equal increments over equal spans of samples.

    With ``n = (global_batch_size - start_batch_size) / batch_size_increment``
    increments and ``c`` the samples consumed before the batch::

      batch(c) = start_batch_size + floor(c · n / rampup_samples) · batch_size_increment
                                                        for c <= rampup_samples,
      batch(c) = global_batch_size                      for c > rampup_samples,

    the arithmetic of ``--rampup-batch-size START INCREMENT SAMPLES`` in
    ``megatron.core.num_microbatches_calculator``, where ``floor(c / (S / n))`` is
    taken in floats; here it is exact (the increment ``i`` starts at
    ``ceil(i · S / n)`` samples, computed in Python integers), so the batch reaches
    ``global_batch_size`` at exactly ``c = rampup_samples``. Megatron updates the
    batch from the samples consumed before each update; ``ow.accumulate`` does the
    same.

    Edge cases: ``start_batch_size == global_batch_size`` is a constant batch (where
    Megatron divides by zero); ``rampup_samples = 0`` gives ``global_batch_size``
    from the start; with fewer ramp samples than increments, several increments
    start at one count and only the last is in force (``batch_sizes`` lists what
    can be returned). Python integers of any size give exact Python integers.
    Arrays (``jit``, ``vmap``) of any integer dtype give int32 batch sizes, exact
    for every count below the dtype's maximum (int32: 2**31 - 1 samples), which
    reads as a saturated counter: past every boundary. A negative count gives 0
    under ``jit`` and raises otherwise.

    Args:
      start_batch_size: the first global batch (an integer >= 1).
      batch_size_increment: the step of each increase (an integer >= 1).
      rampup_samples: samples over which the batch grows (an integer >= 0).
      global_batch_size: the batch after the ramp (an integer >= start).

    Returns:
      A schedule ``consumed_samples -> batch size``; its ``batch_sizes`` attribute
      lists every batch it can return (``ow.accumulate`` checks each against the
      micro-batch).

    Raises:
      TypeError: an argument is not an integer.
      ValueError: where Megatron asserts: a size < 1, negative ``rampup_samples``,
        ``start_batch_size > global_batch_size``, or a span
        ``global_batch_size - start_batch_size`` that the increment does not divide;
        the message names the argument and its value.

    Example:
      >>> import optax_warmup as ow
      >>> batch = ow.rampup_batch_size(32, 32, 300, 128)  # 3 increments, every 100
      >>> [batch(c) for c in (0, 99, 100, 299, 300, 10**30)]
      [32, 32, 64, 96, 128, 128]

    References:
      Shoeybi et al. 2019, Megatron-LM, arXiv:1909.08053 (the implementation's
      ``--rampup-batch-size``); Brown et al. 2020, Language Models are Few-Shot
      Learners, arXiv:2005.14165 (a batch ramp for GPT-3).
    """
    start = _check_positive_int("start_batch_size", start_batch_size)
    increment = _check_positive_int("batch_size_increment", batch_size_increment)
    samples = _check_positive_int("rampup_samples", rampup_samples, low=0)
    final = _check_positive_int("global_batch_size", global_batch_size)
    if start > final:
        raise ValueError(
            f"start_batch_size must be <= global_batch_size, got "
            f"start_batch_size={start}, global_batch_size={final}"
        )
    span = final - start
    if span % increment:
        raise ValueError(
            f"batch_size_increment must divide global_batch_size - start_batch_size, "
            f"got batch_size_increment={increment} for a span of {span} "
            f"({final} - {start})"
        )
    n = span // increment
    if n == 0 or samples == 0:
        return BatchSizeSchedule([0], [final])
    # Increment i (1..n) starts where floor(c·n/S) >= i, i.e. at c = ceil(i·S/n);
    # where several start at one count (S < n), only the last is ever in force.
    table = {0: start}
    for i in range(1, n + 1):
        table[-(-i * samples // n)] = start + i * increment
    return BatchSizeSchedule(list(table), list(table.values()))


def step_batch_size(batch_sizes: Mapping[int, int]) -> BatchSizeSchedule:
    """A batch size that changes at given numbers of consumed samples.

    ``{0: 768, 250_000: 1536, 500_000: 3072}`` runs batches of 768 until 250,000
    samples are consumed, then 1536, then 3072 from 500,000 on: the batch of a
    step is the value of the largest threshold at or below the samples consumed
    before it. This is the form of Megatron-LM's newer step schedule of the batch,
    thresholds in samples.

    Edge cases: one entry ``{0: b}`` is a constant batch. Python integers give
    Python integers (exact at any size); arrays give int32, exact for every count
    below their dtype's maximum (which reads as past every threshold); a negative
    count gives 0 under ``jit`` and raises otherwise.

    Args:
      batch_sizes: a mapping from thresholds (integers >= 0, the smallest 0) to
        batch sizes (integers >= 1).

    Returns:
      A schedule ``consumed_samples -> batch size``, with a ``batch_sizes``
      attribute listing the batches it can return.

    Raises:
      TypeError: ``batch_sizes`` is not a mapping, or a key or value is not an
        integer.
      ValueError: it is empty, its smallest threshold is not 0, or a value is < 1;
        the message names the entry.

    Example:
      >>> import optax_warmup as ow
      >>> batch = ow.step_batch_size({0: 768, 250_000: 1536})
      >>> batch(249_999), batch(250_000)
      (768, 1536)
    """
    if not isinstance(batch_sizes, Mapping):
        raise TypeError(
            "batch_sizes must map thresholds in samples to batch sizes, e.g. "
            f"{{0: 768, 250_000: 1536}}, got {batch_sizes!r}"
        )
    if not batch_sizes:
        raise ValueError("batch_sizes must have at least one entry, {0: batch}")
    entries = []
    for threshold, size in batch_sizes.items():
        name = f"batch_sizes threshold {threshold!r}"
        t = _check_positive_int(name, threshold, low=0)
        b = _check_positive_int(f"batch_sizes[{threshold!r}]", size)
        entries.append((t, b))
    entries.sort()
    if entries[0][0] != 0:
        raise ValueError(
            "batch_sizes must start at 0 samples (the batch before its first "
            f"threshold), got thresholds {[t for t, _ in entries]}"
        )
    return BatchSizeSchedule([t for t, _ in entries], [b for _, b in entries])


def check_batch_schedule(batch_size: Any, micro_batch_size: int) -> None:
    """``ValueError`` if a batch that ``batch_size`` can return is not a multiple of
    ``micro_batch_size`` (an int, or a schedule with a ``batch_sizes`` attribute)."""
    sizes = (
        (batch_size,)
        if isinstance(batch_size, int | np.integer)
        else getattr(batch_size, "batch_sizes", ())
    )
    for size in sizes:
        if size % micro_batch_size:
            multiple = micro_batch_size * math.ceil(size / micro_batch_size)
            raise ValueError(
                f"batch_size must be a multiple of micro_batch_size="
                f"{micro_batch_size}, got a batch of {size} (the nearest multiples "
                f"are {multiple - micro_batch_size} and {multiple})"
            )


def as_batch_schedule(batch_size: Any) -> Any:
    """A callable of the consumed samples for an int or a schedule."""
    if callable(batch_size):
        return batch_size
    return lambda consumed: jnp.full(jnp.shape(consumed), batch_size, jnp.int32)
