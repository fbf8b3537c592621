"""Per-backend XLA defaults and the host allocator setting, applied when `resnet_jax` is imported.

XLA reads `XLA_FLAGS` once, when the first backend initializes, so these defaults are appended to
the environment variable at import time. Each one is added only if the user's `XLA_FLAGS` does not
already name that flag, so a flag given on the command line always wins:

    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_convolution python -m ...

and `RESNET_JAX_XLA_DEFAULTS=0` leaves `XLA_FLAGS` untouched altogether. The `xla_cpu_*` flags only
change how the CPU backend compiles; GPU and TPU ignore them. Every default is here because it
made the training step measurably faster on CPU (docs/PERFORMANCE.md has the measurements).

`reuse_step_memory` tunes glibc's malloc, and dispatches CPU steps synchronously, so that the
memory of one step is reused by the next instead of being handed back to the kernel and faulted
in again; `RESNET_JAX_MALLOC=0` (or a `MALLOC_*` / `GLIBC_TUNABLES` malloc setting of your own)
leaves both alone.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import logging
import os
import platform
import sys
from collections.abc import MutableMapping

DISABLE_ENV = "RESNET_JAX_XLA_DEFAULTS"
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
        "YNNPACK's convs ran resnet18-cifar's train step 1.3x slower than XLA's own (resnet50 and "
        "resnet20: no difference); YNNPACK keeps the dots and reductions",
    ),
}
# The oldest jaxlib known to have every flag above (XLA aborts on a flag it does not know).
MIN_JAXLIB = (0, 10)

log = logging.getLogger(__name__)


def backend_started() -> bool:
    """True once JAX has initialized a backend (after that XLA_FLAGS is no longer read)."""
    if "jax" not in sys.modules:
        return False
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


def switched_off(variable: str, environ: MutableMapping[str, str] | None = None) -> bool:
    """True when the environment variable says off (0, false, no, off); unset means on."""
    environ = os.environ if environ is None else environ
    return environ.get(variable, "1").strip().lower() in ("0", "false", "no", "off")


def flag_names(xla_flags: str) -> set[str]:
    """The flag names (`--name` without a value) in an XLA_FLAGS string."""
    return {token.split("=", 1)[0] for token in xla_flags.split() if token.startswith("--")}


def apply_defaults(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Append the defaults the user has not set to `XLA_FLAGS`; returns the flags it added."""
    environ = os.environ if environ is None else environ
    if switched_off(DISABLE_ENV, environ):
        return []
    if jaxlib_version() < MIN_JAXLIB:
        return []
    current = environ.get("XLA_FLAGS", "")
    present = flag_names(current)
    added = [f"{flag}={value}" for flag, (value, _) in CPU_DEFAULTS.items() if flag not in present]
    if not added:
        return []
    if environ is os.environ and backend_started():
        log.warning(
            "resnet_jax was imported after JAX started its backend, so its XLA defaults (%s) "
            "are not in effect; import resnet_jax first or set XLA_FLAGS yourself.",
            " ".join(added),
        )
        return []
    environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


def reuse_step_memory(environ: MutableMapping[str, str] | None = None) -> bool:
    """Make each train step reuse the memory of the step before, on Linux with glibc.

    XLA:CPU allocates a step's temporaries as one block of hundreds of MB. glibc serves a block
    that large with a fresh mmap and unmaps it when freed, so every step page-faulted its whole
    working set in again (a third of a resnet20 step was kernel time). With one arena (other
    arenas always mmap large blocks), no mmap and no trimming, a freed block stays mapped and the
    next step reuses it. Steps on the CPU are dispatched synchronously, so one step's block is
    freed before the next allocates its own: with asynchronous dispatch several coexisted and the
    heap grew to four times the footprint. Returns True if applied.
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
        import jax

        jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True
