"""resnet_jax: exact, fast ResNet training on CIFAR-10 and image folders in JAX/Flax."""

from resnet_jax import xla_setup as _xla_setup

# Before anything imports jax's backend: XLA reads XLA_FLAGS once, when its first backend starts.
_xla_setup.apply_defaults()
# Before XLA starts its threads: each thread's malloc arena is chosen when it first allocates.
_xla_setup.reuse_step_memory()

__version__ = "0.1.0"
