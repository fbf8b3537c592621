"""resnet_jax: exact, fast ResNet training on CIFAR-10 and image folders in JAX/Flax."""

__version__ = "0.1.0"
