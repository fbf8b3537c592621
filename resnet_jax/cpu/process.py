"""The process settings that make training on the CPU backend faster, applied by `setup()`.

Nothing here runs at import. `setup()` applies, each unless switched off or set by the user:

- XLA flags for the CPU backend, appended to `XLA_FLAGS` (read once, when JAX starts its first
  backend). A flag the user's `XLA_FLAGS` already names wins; `RESNET_JAX_XLA_DEFAULTS=0` adds
  none. GPU and TPU compilation ignore `xla_cpu_*` flags.
- glibc's malloc set to keep freed memory (one arena, no mmap for large blocks, never trim), and
  CPU steps dispatched synchronously, so that each step reuses the memory of the one before
  instead of page-faulting it in again. The cost: the process keeps its largest step's memory
  mapped. `RESNET_JAX_MALLOC=0`, a `MALLOC_*` / `GLIBC_TUNABLES` malloc setting of the user's or
  `JAX_CPU_ENABLE_ASYNC_DISPATCH` (for the dispatch mode alone) leave these alone.

docs/PERFORMANCE.md has the measurements behind each setting.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import logging
import os
import platform
import sys
from collections.abc import MutableMapping
from typing import Any

import jax

XLA_DEFAULTS_ENV = "RESNET_JAX_XLA_DEFAULTS"
MALLOC_ENV = "RESNET_JAX_MALLOC"
ASYNC_DISPATCH_ENV = "JAX_CPU_ENABLE_ASYNC_DISPATCH"
# The environment variables through which a user tunes glibc's malloc; any of them means hands off.
USER_MALLOC_ENV = (
    "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_MAX_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_THRESHOLD_",
)
# mallopt(3) parameters and the values set: one arena, no mmap-served blocks, never trim (mallopt
# takes an int, and glibc reads -1 as SIZE_MAX).
MALLOPT_SETTINGS = {
    "M_ARENA_MAX": (-8, 1),
    "M_MMAP_MAX": (-4, 0),
    "M_TRIM_THRESHOLD": (-1, -1),
}

# flag -> (value, why). Only flags that won a side-by-side measurement belong here.
CPU_DEFAULTS: dict[str, tuple[str, str]] = {
    "--xla_cpu_experimental_ynn_fusion_type": (
        "-individual_convolution",
        "XLA's own convs ran resnet18-cifar's train step faster than YNNPACK's; YNNPACK keeps "
        "the dots and reductions",
    ),
}
# The oldest jaxlib known to have every flag above (XLA aborts on a flag it does not know).
MIN_JAXLIB = (0, 10)
# Installed distributions (names normalized to lower case with dashes) that give JAX an
# accelerator: with one of them JAX prefers it to the CPU.
ACCELERATOR_PLUGINS = ("jax-cuda", "jax-rocm", "libtpu")

# An older x86 CPU, imitated on a newer one: for each instruction-set cap, the setting by which
# each library that picks its code by CPU is held to it (oneDNN: the shim's and PyTorch's convs;
# XLA:CPU's generated code; PyTorch's own kernels). Eigen inside XLA is compiled for the wheel's
# baseline and YNNPACK dispatches on its own, so neither changes with the cap.
ISA_CAPS: dict[str, dict[str, str]] = {
    "AVX2": {
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "--xla_cpu_max_isa": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
    },
}

log = logging.getLogger(__name__)


def isa_capped_environment(isa: str, environ: MutableMapping[str, str] | None = None) -> dict:
    """A copy of `environ` (default: this process's) in which oneDNN, XLA:CPU and PyTorch use no
    instruction set beyond `isa` (a key of `ISA_CAPS`), as on a CPU that has no more.

    For tests and benchmarks of what an older CPU gets: the libraries read these when they start,
    so give it to a new process (or apply it before JAX starts a backend and torch is imported).
    """
    environ = dict(os.environ if environ is None else environ)
    for name, value in ISA_CAPS[isa].items():
        if name.startswith("--"):
            environ["XLA_FLAGS"] = f"{environ.get('XLA_FLAGS', '')} {name}={value}".strip()
        else:
            environ[name] = value
    return environ


def switched_off(variable: str, environ: MutableMapping[str, str] | None = None) -> bool:
    """True when the environment variable says off (0, false, no, off); unset means on."""
    environ = os.environ if environ is None else environ
    return environ.get(variable, "1").strip().lower() in ("0", "false", "no", "off")


def backend_started() -> bool:
    """True once JAX has initialized a backend (after that XLA_FLAGS is no longer read)."""
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a JAX without this helper: assume it has not
        return False


def jaxlib_version() -> tuple[int, ...]:
    """(major, minor) of the installed jaxlib, read without importing it; (0,) if unknown."""
    try:
        version = importlib.metadata.version("jaxlib")
        return tuple(int(part) for part in version.split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return (0,)


def flag_names(xla_flags: str) -> set[str]:
    """The flag names (`--name` without a value) in an XLA_FLAGS string."""
    return {token.split("=", 1)[0] for token in xla_flags.split() if token.startswith("--")}


def apply_xla_defaults(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Append the defaults the user has not set to `XLA_FLAGS`; returns the flags it added."""
    environ = os.environ if environ is None else environ
    if switched_off(XLA_DEFAULTS_ENV, environ) or jaxlib_version() < MIN_JAXLIB:
        return []
    current = environ.get("XLA_FLAGS", "")
    present = flag_names(current)
    added = [f"{flag}={value}" for flag, (value, _) in CPU_DEFAULTS.items() if flag not in present]
    if not added:
        return []
    if environ is os.environ and backend_started():
        log.warning(
            "JAX started its backend before resnet_jax.cpu.setup(), so its XLA flags (%s) are "
            "not in effect; call setup() first or set XLA_FLAGS yourself.",
            " ".join(added),
        )
        return []
    environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


def reuse_step_memory(environ: MutableMapping[str, str] | None = None) -> bool:
    """Make each train step reuse the memory of the step before, on Linux with glibc.

    XLA:CPU allocates a step's temporaries as one large block. glibc serves a block that large
    with a fresh mmap and unmaps it when freed, so every step page-faulted its whole working set
    in again. With one arena (other arenas always mmap large blocks), no mmap and no trimming, a
    freed block stays mapped and the next step reuses it. Steps on the CPU are dispatched
    synchronously, so one step's block is freed before the next allocates its own (with
    asynchronous dispatch several coexisted and the heap grew several times the footprint).
    Returns True if applied.
    """
    environ = os.environ if environ is None else environ
    if switched_off(MALLOC_ENV, environ) or sys.platform != "linux":
        return False
    if any(name in environ for name in USER_MALLOC_ENV) or "malloc" in environ.get(
        "GLIBC_TUNABLES", ""
    ):
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the process's own C library, whose malloc everything shares
    if not all(libc.mallopt(param, value) == 1 for param, value in MALLOPT_SETTINGS.values()):
        return False
    if ASYNC_DISPATCH_ENV not in environ:  # a user's own choice wins
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True


def setup() -> dict[str, Any]:
    """Apply the CPU process settings: XLA flags, glibc malloc and synchronous CPU dispatch.

    Call it before JAX starts a backend (before the first computation or `jax.devices()`), and
    from the process's main thread before other threads allocate. The environment variables in
    this module's docstring switch each setting off. Returns (and logs) what it applied:
    {"xla_flags": [flags added], "malloc": bool, "sync_dispatch": bool}.
    """
    async_before = jax.config.values["jax_cpu_enable_async_dispatch"]
    applied = {"xla_flags": apply_xla_defaults(), "malloc": reuse_step_memory()}
    applied["sync_dispatch"] = (
        async_before and not jax.config.values["jax_cpu_enable_async_dispatch"]
    )
    log.info("CPU process settings applied: %s", applied)
    return applied


def will_run_on_cpu(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether JAX will pick the CPU backend, decided without starting one.

    `JAX_PLATFORMS` when set: its first platform. Otherwise the CPU unless an accelerator
    plugin (jax-cuda*-plugin, jax-rocm*, libtpu) is installed.
    """
    environ = os.environ if environ is None else environ
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms.strip():
        return platforms.split(",")[0].strip().lower() == "cpu"
    installed = {
        (dist.metadata["Name"] or "").lower().replace("_", "-")
        for dist in importlib.metadata.distributions()
    }
    return not any(name.startswith(ACCELERATOR_PLUGINS) for name in installed)


def setup_if_cpu() -> dict[str, Any] | None:
    """`setup()` when this process will run on the CPU (`will_run_on_cpu`); None otherwise.

    What the command lines call at start-up.
    """
    return setup() if will_run_on_cpu() else None
