"""optax_warmup: the large-minibatch recipe of Goyal et al. 2017 for Optax and Flax.

Learning-rate warmup and the linear scaling rule, weight decay that skips
BatchNorm parameters and biases, label smoothing, and the zero-gamma and
Gaussian initializations, as pure functions and optax transformations.
"""

__version__ = "0.1.0"

__all__ = [
    "__version__",
]
