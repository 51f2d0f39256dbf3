"""Ready optimizers of the large-minibatch recipe, each an ``optax.chain`` of parts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import optax

from optax_warmup._schedules import goyal_schedule
from optax_warmup._transforms import keep_update_dtype
from optax_warmup._validation import check_real
from optax_warmup._weight_decay import MaskOrFn, decay_mask, masked_weight_decay


def goyal_sgd(
    batch_size: int,
    steps_per_epoch: int,
    *,
    base_lr: float = 0.1,
    base_batch_size: int = 256,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: MaskOrFn | None = decay_mask,
    warmup_epochs: float = 5,
    milestones: Sequence[float] = (30, 60, 80),
    warmup: Literal["gradual", "constant", "none"] = "gradual",
) -> optax.GradientTransformationExtraArgs:
    """SGD with momentum as Goyal et al. trained ResNet-50 with minibatches of 8k.

    Per step ``t``, for each parameter ``w`` with gradient ``g``::

      g ← g + λ·w          only where mask(w) (not BatchNorm γ, β nor biases)
      v ← m·v + g
      w ← w − η(t)·v       η = goyal_schedule(batch_size, steps_per_epoch, ...)

    where ``η(t)`` follows the linear scaling rule (``base_lr · batch_size /
    base_batch_size``), a gradual warmup over ``warmup_epochs`` and a division by 10
    at each of ``milestones`` (epochs). It is::

      optax.chain(
          ow.masked_weight_decay(weight_decay, mask),
          optax.inject_hyperparams(optax.sgd)(
              learning_rate=ow.goyal_schedule(...),
              momentum=momentum, nesterov=nesterov))

    with updates cast back to their own dtype (bf16 stays bf16; optax's
    ``inject_hyperparams`` alone returns float32), so ``ow.current_lr(state)`` reads
    the rate and a checkpoint of the state resumes exactly.

    optax's SGD keeps ``v`` free of the learning rate (``w ← w − η·v``), the second
    form of Goyal et al.'s section 2.3: when ``η`` changes (warmup, milestones) no
    momentum correction ``η(t+1)/η(t)`` is needed, unlike the form ``u ← m·u +
    η·g``, ``w ← w − u`` that the paper's correction is for.

    The schedule counts optimizer updates: under ``optax.MultiSteps(tx, k)`` it
    advances once every ``k`` micro-batches, so give ``batch_size`` as the batch of
    one update (``k`` micro-batches) and ``steps_per_epoch`` in updates.

    Edge cases: the first update uses ``base_lr`` (``warmup="gradual"``), the update
    of count ``warmup_epochs · steps_per_epoch`` the full rate; ``momentum=0`` is
    plain SGD; ``weight_decay=0`` turns the decay off.

    Args:
      batch_size: the global minibatch size kn of one update (> 0).
      steps_per_epoch: optimizer updates per epoch (an integer > 0).
      base_lr: the rate tuned for ``base_batch_size`` (0.1 for 256 in the paper).
      base_batch_size: the batch size ``base_lr`` belongs to.
      momentum: m, in [0, 1).
      nesterov: Nesterov momentum.
      weight_decay: λ, a number >= 0 or a schedule (1e-4 in the paper).
      mask: which leaves are decayed: ``decay_mask`` (default), a function, a tree
        of bools, or None for all (see ``masked_weight_decay``).
      warmup_epochs: length of the warmup in epochs (may be fractional).
      milestones: epochs at which the rate is divided by 10.
      warmup: ``"gradual"``, ``"constant"`` or ``"none"``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Raises:
      ValueError: ``momentum`` outside [0, 1), ``weight_decay`` negative or NaN, or
        any argument that ``goyal_schedule`` rejects; the message names it.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import optax_warmup as ow
      >>> tx = ow.goyal_sgd(batch_size=8192, steps_per_epoch=156)
      >>> params = {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.zeros_like, params)
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> float(ow.current_lr(state)), params["kernel"][0, 0].item()  # 1 - 0.1·1e-4
      (0.10000000149011612, 0.9999899864196777)

    References:
      Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour,
      arXiv:1706.02677, sections 2, 3 and 5.1; He et al. 2019, Bag of Tricks for
      Image Classification with Convolutional Neural Networks, arXiv:1812.01187,
      section 3.1 (no bias decay).
    """
    check_real("momentum", momentum, low=0.0, high=1.0, high_open=True)
    schedule = goyal_schedule(
        batch_size,
        steps_per_epoch,
        base_lr=base_lr,
        base_batch_size=base_batch_size,
        warmup_epochs=warmup_epochs,
        milestones=milestones,
        warmup=warmup,
    )
    return optax.chain(
        masked_weight_decay(weight_decay, mask),
        keep_update_dtype(
            optax.inject_hyperparams(optax.sgd)(
                learning_rate=schedule, momentum=momentum, nesterov=nesterov
            )
        ),
    )
