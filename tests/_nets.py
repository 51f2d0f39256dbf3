"""Small networks shared by the tests: the same layers in linen and in nnx."""

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(3)(nn.relu(x).mean((1, 2)))


class NnxNet(nnx.Module):
    """The same network in nnx, with linen's names so that the paths agree."""

    def __init__(self, rngs, dtype=jnp.float32):
        self.Conv_0 = nnx.Conv(1, 4, (3, 3), param_dtype=dtype, rngs=rngs)
        self.BatchNorm_0 = nnx.BatchNorm(4, param_dtype=dtype, rngs=rngs)
        self.Dense_0 = nnx.Linear(4, 3, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.BatchNorm_0(self.Conv_0(x)))
        return self.Dense_0(x.mean((1, 2)))
