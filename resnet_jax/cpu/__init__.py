"""Everything that exists for speed on the CPU backend, as a plug-in.

- `kernels`: the kernel set `models.get_model(kernels="cpu")` plugs into the ResNet (and "auto"
  does on a single CPU device): a conv hook (oneDNN, im2col for tiny maps, 1x1 convs as dots), a
  max-pool and a BatchNorm with their own VJPs. Same variables and numbers as plain Flax. Its
  `kernel_modules` is the choice between this set and plain Flax that `get_model` asks for.
- `onednn`: the C++ shim those kernels call, compiled on first use.
- `setup()`: the process settings (XLA flags, glibc malloc, synchronous CPU dispatch). The
  command lines call `setup_if_cpu()` at start-up; programmatic users call `setup()` themselves,
  before JAX starts a backend.

Importing this package changes nothing in the process.
"""

from resnet_jax.cpu.process import (
    ISA_CAPS,
    isa_capped_environment,
    setup,
    setup_if_cpu,
    will_run_on_cpu,
)

__all__ = ["ISA_CAPS", "isa_capped_environment", "setup", "setup_if_cpu", "will_run_on_cpu"]
