"""The layers the ResNet family (models.py) and the CPU kernel set (cpu/kernels.py) share.

`BatchNorm` is the ResNet's norm: flax's variables and numbers with torch's running statistics.
The CPU kernel set subclasses it, so both kernel sets hold the same variables.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class BatchNorm(nn.Module):
    """Batch norm over the last axis with flax's variables and numbers and torch's statistics.

    As torch's BatchNorm2d (whose running averages torchvision's checkpoints hold), the running
    variance averages the unbiased batch variance, n / (n - 1) times the biased one that
    normalizes the batch. `normalize_batch` is the training-mode computation a kernel set may
    replace.
    """

    use_running_average: bool | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None
    scale_init: Callable[..., jax.Array] = nn.initializers.ones
    bias_init: Callable[..., jax.Array] = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        x = x.astype(self.dtype)
        if use_running_average:
            inv = jax.lax.rsqrt(ra_var.value + self.epsilon)
            return ((x - ra_mean.value) * (inv * scale) + bias).astype(self.dtype)
        initializing = self.is_initializing()  # no device axis yet, and no statistics to keep
        axis_name = None if initializing else self.axis_name
        y, mean, var = self.normalize_batch(x, scale, bias, axis_name)
        if not initializing:
            count = x.size // x.shape[-1] * (jax.lax.psum(1, axis_name) if axis_name else 1)
            unbiased = var * (count / max(count - 1, 1))
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
        return y

    def normalize_batch(
        self, x: jax.Array, scale: jax.Array, bias: jax.Array, axis_name: str | None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(y, batch mean, biased batch variance): float32 statistics E[x], E[x^2] - E[x]^2 over
        every axis but the last and every device of `axis_name`, as flax's BatchNorm."""
        wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        axes = tuple(range(x.ndim - 1))
        mean, mean_of_squares = wide.mean(axes), jnp.square(wide).mean(axes)
        if axis_name is not None:
            mean, mean_of_squares = jax.lax.pmean((mean, mean_of_squares), axis_name)
        var = jnp.maximum(0.0, mean_of_squares - mean * mean)
        y = (wide - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return y.astype(self.dtype), mean, var
