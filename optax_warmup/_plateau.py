"""Reduce-on-plateau that starts watching the loss only after the warmup.

``optax.contrib.reduce_on_plateau`` scales the updates by a factor it cuts when the
loss stops improving. In front of it a warmup raises the rate, and a rising rate can
hold the loss up: read as a plateau, the rate is cut before training has begun. The
transformation here feeds the loss to optax's plateau logic from the end of the
warmup on, and applies each cut from the update after the one that decided it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.contrib
from jax.typing import ArrayLike

from optax_warmup._validation import check_int, check_real


class PlateauAfterWarmupState(NamedTuple):
    """State of ``reduce_on_plateau_after``."""

    count: jax.Array  # type: ignore[assignment]  # int32 scalar: updates so far.
    scale: jax.Array  # float32 scalar: the scale the most recent update used.
    plateau: optax.contrib.ReduceLROnPlateauState  # optax's, fed after the warmup.


def reduce_on_plateau_after(
    warmup_steps: int,
    *,
    factor: float = 0.1,
    patience: int = 10,
    rtol: float = 1e-4,
    atol: float = 0.0,
    cooldown: int = 0,
    accumulation_size: int = 1,
    min_scale: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """Cuts the rate by ``factor`` when the loss plateaus, ignoring the warmup.

    Chain it after any recipe and pass the loss to ``update``::

      tx = optax.chain(ow.sgd(schedule), ow.reduce_on_plateau_after(warmup_steps))
      updates, state = tx.update(grads, state, params, value=loss)

    The updates are multiplied by a scale ``s`` (1 at first). The first
    ``warmup_steps`` updates leave the plateau logic untouched: their losses are
    neither averaged nor compared, so a rate still rising cannot be read as a
    plateau, and the best loss starts afresh at the end of the warmup. From then on
    the loss goes to ``optax.contrib.reduce_on_plateau(factor, patience, ...)``:
    the mean of every ``accumulation_size`` losses is compared with the best mean
    (improvement: ``mean < (1 - rtol)·best - atol``), and after ``patience`` means
    without improvement ``s ← max(s·factor, min_scale)``, followed by ``cooldown``
    means that are not counted. ``patience`` counts as in optax: torch's
    ``ReduceLROnPlateau(patience=p)`` cuts one mean later, at ``p + 1``.

    The update on which a cut is decided still uses the old scale; the cut applies
    from the next update (optax's own applies it at once, to the update whose loss
    was measured before the cut). ``ow.current_lr`` multiplies in the scale that
    the most recent update used. The scale, the best loss and the counters are in
    the state, so a resumed run continues with the same scale.

    Edge cases: ``warmup_steps=0`` watches from the first update; a NaN loss never
    counts as an improvement; ``update`` without ``value=`` raises ``TypeError``.

    Args:
      warmup_steps: updates to ignore, the warmup of the schedule (an integer >= 0).
      factor: the cut, in (0, 1).
      patience: means without improvement before a cut (an integer >= 1).
      rtol: relative improvement needed, in [0, 1].
      atol: absolute improvement needed (>= 0; ``rtol`` or ``atol`` > 0).
      cooldown: means ignored after a cut (an integer >= 0).
      accumulation_size: losses averaged into one mean (an integer >= 1): 1 for an
        evaluation loss, more for noisy per-batch losses.
      min_scale: the scale never goes below it, in [0, 1].

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
      ``value=loss``; its state is a ``PlateauAfterWarmupState``.

    Raises:
      ValueError: an argument outside its range; the message names it.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import optax_warmup as ow
      >>> tx = optax.chain(optax.inject_hyperparams(optax.sgd)(learning_rate=1.0),
      ...                  ow.reduce_on_plateau_after(2, patience=2))
      >>> params = {"w": jnp.zeros(())}
      >>> state = tx.init(params)
      >>> rates = []
      >>> for loss in [9.0, 12.0, 5.0, 5.0, 5.0, 5.0]:  # the warmup's 12 is ignored
      ...     _, state = tx.update({"w": jnp.ones(())}, state, params, value=loss)
      ...     rates.append(round(float(ow.current_lr(state)), 3))
      >>> rates  # the cut decided at the 5th update applies from the 6th
      [1.0, 1.0, 1.0, 1.0, 1.0, 0.1]

    References:
      Goyal et al. 2017, arXiv:1706.02677, section 2.2 (warmup); PyTorch's
      ``torch.optim.lr_scheduler.ReduceLROnPlateau``.
    """
    check_int("warmup_steps", warmup_steps)
    check_real("factor", factor, low=0.0, high=1.0, low_open=True, high_open=True)
    check_int("patience", patience, low=1)
    check_real("rtol", rtol, low=0.0, high=1.0)
    check_real("atol", atol, low=0.0)
    if not (rtol > 0 or atol > 0):
        raise ValueError(f"rtol or atol must be > 0, got rtol={rtol}, atol={atol}")
    check_int("cooldown", cooldown)
    check_int("accumulation_size", accumulation_size, low=1)
    check_real("min_scale", min_scale, low=0.0, high=1.0)
    plateau = optax.contrib.reduce_on_plateau(
        factor=factor,
        patience=patience,
        rtol=rtol,
        atol=atol,
        cooldown=cooldown,
        accumulation_size=accumulation_size,
        min_scale=min_scale,
    )

    def init_fn(params: optax.Params) -> PlateauAfterWarmupState:
        inner = plateau.init(params)
        return PlateauAfterWarmupState(
            count=jnp.zeros([], jnp.int32),
            scale=jnp.asarray(inner.scale, jnp.float32),
            plateau=inner,
        )

    def update_fn(updates, state, params=None, *, value: ArrayLike, **extra_args):
        del params, extra_args
        scale = jnp.asarray(state.plateau.scale, jnp.float32)
        watching = state.count >= warmup_steps
        _, fed = plateau.update(updates, state.plateau, value=value)
        inner = jax.tree.map(
            lambda new, old: jnp.where(watching, new, old), fed, state.plateau
        )
        updates = jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)
        count = optax.safe_increment(state.count)
        return updates, PlateauAfterWarmupState(count, scale, inner)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
