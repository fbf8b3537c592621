"""resnet_jax: exact, fast ResNet training on CIFAR-10 and image folders in JAX/Flax.

Importing it changes nothing in the process; `resnet_jax.cpu.setup()` applies the CPU process
settings (the command lines do so at start-up when they run on the CPU).
"""

__version__ = "0.1.0"
