"""A learning rate that follows the batch: a schedule of consumed samples, scaled by
the batch of each update.

When the batch grows during training, a schedule of optimizer updates stretches and
squeezes with it; Megatron-LM counts its rate schedule in samples instead
(``--lr-warmup-samples``, ``--lr-decay-samples``). ``batch_scaled_rate`` does that and
also applies a batch scaling rule at each update, from the batch that update uses:
linear (Goyal et al.), square root (as for Adam), or none. The recipes read the
consumed samples and the batch from the extra arguments that ``ow.accumulate`` hands
on.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from optax_warmup._validation import check_choice, check_int, check_real

BatchRule = Literal["linear", "sqrt", "none"]
_RULES: tuple[str, ...] = typing.get_args(BatchRule)


class BatchScaledRate:
    """``rate(consumed_samples, batch_size) = schedule(consumed) · rule(batch / base)``.

    Made by ``ow.batch_scaled_rate``; the recipes (``ow.sgd``, ``ow.lars``,
    ``ow.lamb``, ``ow.adamw``) evaluate it at each update.
    """

    def __init__(
        self,
        schedule: optax.Schedule,
        base_batch_size: int | None,
        rule: BatchRule,
    ):
        self.schedule = schedule
        self.base_batch_size = base_batch_size
        self.rule = rule

    def __repr__(self) -> str:
        return (
            f"BatchScaledRate({self.schedule!r}, base_batch_size="
            f"{self.base_batch_size!r}, rule={self.rule!r})"
        )

    def factor(self, batch_size: ArrayLike) -> jax.Array:
        """The batch rule's factor for ``batch_size`` (1 at the base batch)."""
        if self.rule == "none":
            return jnp.ones([], jnp.float32)
        ratio = jnp.asarray(batch_size, jnp.float32) / jnp.float32(self.base_batch_size)
        return ratio if self.rule == "linear" else jnp.sqrt(ratio)

    def __call__(
        self, consumed_samples: ArrayLike, batch_size: ArrayLike | None = None
    ) -> jax.Array:
        if batch_size is None:
            raise TypeError(
                "a batch_scaled_rate is a rate of the consumed samples and the batch: "
                "give it to ow.sgd, ow.lars, ow.lamb or ow.adamw inside ow.accumulate "
                "(an optax optimizer would call it with its step count alone)"
            )
        rate = jnp.asarray(self.schedule(consumed_samples), jnp.float32)
        return rate * self.factor(batch_size)

    def at_update(self, extra_args: dict[str, Any]) -> jax.Array:
        """The rate of an update, from the extra arguments of ``ow.accumulate``."""
        needed = ("consumed_samples", "b_big")
        missing = [name for name in needed if extra_args.get(name) is None]
        if missing:
            raise TypeError(
                "a batch_scaled_rate needs the samples consumed and the batch of each "
                "update: wrap the optimizer in ow.accumulate (or pass "
                f"consumed_samples= and b_big= to update), missing {', '.join(missing)}"
            )
        return self(extra_args["consumed_samples"], extra_args["b_big"])


def batch_scaled_rate(
    learning_rate: optax.ScalarOrSchedule,
    *,
    base_batch_size: int | None = None,
    rule: BatchRule = "linear",
) -> BatchScaledRate:
    r"""A learning rate counted in samples and scaled by the batch of each update.

    For an update that uses a batch of ``b`` after ``c`` samples were consumed,

    .. math::

      \eta = \eta_0(c) \cdot \begin{cases}
        b / b_0 & \text{linear (Goyal et al.'s linear scaling rule)} \\
        \sqrt{b / b_0} & \text{sqrt (a common rule for Adam)} \\
        1 & \text{none (Megatron-LM: a schedule of samples only)}
      \end{cases}

    with ``η₀`` the schedule tuned at the base batch ``b₀``, counted in consumed
    samples, so it runs through its warmup and decay at the same point of the data
    however the batch changes (Megatron-LM's ``--lr-warmup-samples`` and
    ``--lr-decay-samples``). Give it to a recipe inside ``ow.accumulate``::

      batch = ow.rampup_batch_size(32, 32, 100_000, 1024)
      lr = ow.batch_scaled_rate(ow.warmup_schedule(0.1, 20_000, after=0.1),
                                base_batch_size=32)
      tx = ow.accumulate(ow.sgd(lr), batch_size=batch, micro_batch_size=32)

    ``accumulate`` hands each update its batch (``b_big``) and the samples consumed
    before it (``consumed_samples``); ``ow.current_lr`` reads the rate used.

    Edge cases: the rate is taken at the samples consumed *before* the update (the
    first update uses ``η₀(0)``); the count stops at 2**31 - 1 samples (about
    2.1e9) unless ``jax_enable_x64`` is on (see ``ow.accumulate``). Before the first
    update the recipe's state holds ``η₀(0)`` at the base batch (factor 1), which
    ``ow.current_lr`` reads. The schedule receives the integer count (int32, int64
    with x64); this library's schedules cast it to float32,
    exact up to 2**24 samples (a boundary may move by a few samples beyond). A
    recipe given this rate raises ``TypeError`` at ``update`` when it is not handed
    ``consumed_samples=`` and ``b_big=``.

    Args:
      learning_rate: ``η₀``, a number >= 0 or a schedule of consumed samples.
      base_batch_size: ``b₀``, the batch ``η₀`` was tuned for (an integer >= 1);
        needed unless ``rule="none"``.
      rule: ``"linear"``, ``"sqrt"`` or ``"none"``.

    Returns:
      A ``BatchScaledRate``, for the ``learning_rate`` of ``ow.sgd``, ``ow.lars``,
      ``ow.lamb`` or ``ow.adamw``.

    Raises:
      ValueError: ``rule`` is not one of the three, ``base_batch_size`` is missing
        for a rule that needs it or not an integer >= 1, or a constant rate is
        negative or not finite.

    Example:
      >>> import optax_warmup as ow
      >>> lr = ow.batch_scaled_rate(0.1, base_batch_size=32, rule="linear")
      >>> float(lr(consumed_samples=0, batch_size=256))  # 0.1 · 256 / 32
      0.800000011920929
      >>> lr = ow.batch_scaled_rate(1e-3, base_batch_size=64, rule="sqrt")
      >>> round(float(lr(consumed_samples=0, batch_size=256)), 6)  # 1e-3 · √4
      0.002

    References:
      Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
      arXiv:1706.02677, section 2.1; Shoeybi et al. 2019, Megatron-LM,
      arXiv:1909.08053 (schedules counted in samples).
    """
    check_choice("rule", rule, _RULES)
    if rule != "none" or base_batch_size is not None:
        if base_batch_size is None:
            raise ValueError(
                f"base_batch_size is needed for rule={rule!r} (the batch the rate "
                "was tuned for); rule='none' does without"
            )
        check_int("base_batch_size", base_batch_size, low=1)
    if callable(learning_rate):
        schedule = learning_rate
    else:
        check_real("learning_rate", learning_rate, low=0.0)
        value = float(learning_rate)

        def schedule(count: ArrayLike) -> jax.Array:
            del count
            return jnp.float32(value)

    return BatchScaledRate(schedule, base_batch_size, rule)
