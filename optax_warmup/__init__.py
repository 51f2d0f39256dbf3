"""optax_warmup: the large-minibatch recipe of Goyal et al. 2017 for Optax and Flax.

Learning-rate warmup and the linear scaling rule, weight decay that skips
BatchNorm parameters and biases, label smoothing, and the zero-gamma and
Gaussian initializations, as pure functions and optax transformations.
"""

from optax_warmup import models
from optax_warmup._accumulation import (
    AccumulateState,
    accumulate,
    consumed_samples,
    current_batch_size,
)
from optax_warmup._adascale import (
    AdaScaleState,
    adascale,
    adascale_progress,
    current_gain,
)
from optax_warmup._batch_rates import BatchScaledRate, batch_scaled_rate
from optax_warmup._batch_schedules import (
    BatchSizeSchedule,
    rampup_batch_size,
    step_batch_size,
)
from optax_warmup._initializers import gaussian_fc_init, he_conv_init, zero_gamma_init
from optax_warmup._losses import smooth_labels, smoothed_cross_entropy
from optax_warmup._noise_scale import (
    NoiseScaleState,
    average_group_grads,
    current_noise_scale,
    noise_scale_estimates,
    track_noise_scale,
    value_and_grad_by_group,
)
from optax_warmup._plateau import PlateauAfterWarmupState, reduce_on_plateau_after
from optax_warmup._recipes import adamw, goyal_sgd, lamb, lars, sgd
from optax_warmup._schedules import (
    goyal_schedule,
    gradual_warmup_schedule,
    linear_scaling_rule,
    step_decay_schedule,
    untuned_warmup_schedule,
    warmup_schedule,
    wsd_schedule,
)
from optax_warmup._transforms import ScaleByWarmupState, current_lr, scale_by_warmup
from optax_warmup._weight_decay import decay_mask, decay_report, masked_weight_decay

__version__ = "0.1.0"

__all__ = [
    "AccumulateState",
    "AdaScaleState",
    "BatchScaledRate",
    "BatchSizeSchedule",
    "NoiseScaleState",
    "PlateauAfterWarmupState",
    "ScaleByWarmupState",
    "__version__",
    "accumulate",
    "adamw",
    "adascale",
    "adascale_progress",
    "average_group_grads",
    "batch_scaled_rate",
    "consumed_samples",
    "current_batch_size",
    "current_gain",
    "current_lr",
    "current_noise_scale",
    "decay_mask",
    "decay_report",
    "gaussian_fc_init",
    "goyal_schedule",
    "goyal_sgd",
    "gradual_warmup_schedule",
    "he_conv_init",
    "lamb",
    "lars",
    "linear_scaling_rule",
    "masked_weight_decay",
    "models",
    "noise_scale_estimates",
    "rampup_batch_size",
    "reduce_on_plateau_after",
    "scale_by_warmup",
    "sgd",
    "smooth_labels",
    "smoothed_cross_entropy",
    "step_batch_size",
    "step_decay_schedule",
    "track_noise_scale",
    "untuned_warmup_schedule",
    "value_and_grad_by_group",
    "warmup_schedule",
    "wsd_schedule",
    "zero_gamma_init",
]
