"""2-D convolutions through oneDNN on the CPU backend, as XLA FFI custom calls, and BatchNorm's
per-channel sums from the same shim.

XLA:CPU runs convolutions with Eigen, which on ResNet's 3x3 convs is slower than oneDNN (the
library PyTorch uses), most of all for the kernel gradient, whose input XLA first copies
channels-major. `conv` calls oneDNN instead, on NHWC activations in place, with a custom VJP whose
input and kernel gradients are oneDNN's own backward primitives. `channel_sums` gives BatchNorm
its sums in one pass over the activations.

The small C++ shim (`csrc/cpu_kernels.cc`) is compiled on first use with the system's C++ compiler
against the `onednn-cpu-gomp` wheel and cached in `~/.cache/resnet_jax/onednn` (or
`$RESNET_JAX_CACHE`). When that is not possible (no compiler, no oneDNN wheel, not Linux x86-64)
`available()` is False, one warning says why, and the kernels use XLA's convolutions: the results
are the same up to float rounding. `RESNET_JAX_ONEDNN=0` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from resnet_jax.cpu import process

DISABLE_ENV = "RESNET_JAX_ONEDNN"
SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cc"
_TARGETS = {
    "forward": "ResnetJaxConvForward",
    "backward_data": "ResnetJaxConvBackwardData",
    "backward_weights": "ResnetJaxConvBackwardWeights",
    "channel_sums": "ResnetJaxChannelSums",
}

log = logging.getLogger(__name__)


class BuildError(RuntimeError):
    """The oneDNN shim could not be compiled or loaded (the message says why)."""


def _package_file(distribution: str, name: str) -> Path:
    """The installed file `name` (a path suffix) of a pip distribution."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise BuildError(f"the {distribution} package is not installed") from None
    for file in files:
        if str(file).endswith(name):
            return Path(file.locate()).resolve()
    raise BuildError(f"{distribution} has no {name}")


def _cache_root() -> Path:
    default = Path("~/.cache/resnet_jax").expanduser()
    return Path(os.environ.get("RESNET_JAX_CACHE", default)) / "onednn"


def build_library() -> Path:
    """Compile the shim (once per source, jaxlib and oneDNN version) and return the .so path."""
    header = _package_file("onednn-devel-cpu-gomp", "oneapi/dnnl/dnnl.hpp")
    library = _package_file("onednn-cpu-gomp", "/libdnnl.so.3")
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise BuildError(f"no C++ compiler ({compiler}) on PATH; install g++ or set CXX")
    ffi_include = jax.ffi.include_dir()
    versions = [SOURCE.read_bytes(), compiler.encode(), str(library).encode()]
    versions.append(importlib.metadata.version("jaxlib").encode())
    fingerprint = hashlib.sha256(b"|".join(versions)).hexdigest()[:16]
    target = _cache_root() / fingerprint / "libresnet_jax_onednn.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Concurrent first uses each build their own file; the atomic rename keeps one of them.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    command = [
        compiler, "-O2", "-std=c++17", "-fopenmp", "-shared", "-fPIC", "-w", str(SOURCE),
        "-o", partial, f"-I{header.parents[2]}", f"-I{ffi_include}", f"-L{library.parent}",
        "-l:libdnnl.so.3", f"-Wl,-rpath,{library.parent}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        os.unlink(partial)
        raise BuildError(f"compiling {SOURCE.name} failed:\n{result.stderr[-2000:]}")
    os.replace(partial, target)
    return target


@functools.cache
def loaded() -> ctypes.CDLL | None:
    """The shim, built, loaded and its FFI targets registered; None when it is off or cannot be
    built here (one warning says why)."""
    if process.switched_off(DISABLE_ENV):
        return None
    try:
        library = ctypes.cdll.LoadLibrary(str(build_library()))
    except (BuildError, OSError) as error:
        log.warning("The oneDNN shim is off, XLA's convs and sums are used instead: %s", error)
        return None
    for name in _TARGETS.values():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), platform="cpu")
    query = library.ResnetJaxConvImplementations
    query.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_char_p, ctypes.c_int64]
    query.restype = ctypes.c_int64
    return library


def available() -> bool:
    """True when the shim's kernels can run here: enabled, Linux x86-64, built and registered."""
    return loaded() is not None


def usable(lhs: jax.Array, rhs: jax.Array) -> bool:
    """Whether `channel_sums` (and, where `conv_usable` says so, `conv`) applies to these operands
    in the computation being traced.

    float32 or bfloat16 (both operands alike) on a single CPU device only: under a
    multi-device sharding XLA cannot partition a custom call.
    """
    return (
        lhs.dtype == rhs.dtype
        and lhs.dtype in (jnp.float32, jnp.bfloat16)
        and jax.default_backend() == "cpu"
        and jax.device_count() == 1
        and available()
    )


@functools.cache
def conv_implementations(
    lhs_shape: tuple[int, ...], rhs_shape: tuple[int, ...], dtype: str, strides, padding
) -> tuple[str, str, str]:
    """The oneDNN implementations ("jit:avx2", "brgconv:avx512_core", "ref:any", ...) of this conv's
    forward, input-gradient and kernel-gradient primitives on this CPU; "" for one that oneDNN
    cannot build here (a bfloat16 conv without AVX-512, for one). Asked once per conv."""
    (pt, pb), (pl, pr) = padding
    out_shape = _out_shape(lhs_shape, rhs_shape, strides, padding)
    dims = (*lhs_shape, *rhs_shape, *out_shape, *strides, pt, pb, pl, pr)
    names = ctypes.create_string_buffer(1024)
    length = loaded().ResnetJaxConvImplementations(
        int(dtype == "bfloat16"), (ctypes.c_int64 * len(dims))(*dims), names, len(names)
    )
    assert length >= 0, "the implementation names do not fit their buffer"
    forward, data, weights = names.value.decode().split(";")
    return forward, data, weights


def has_fast_conv(lhs_shape, rhs_shape, dtype: str, strides, padding) -> bool:
    """Whether oneDNN builds all three primitives of this conv on this CPU with an optimized
    implementation (its reference ones are far slower than XLA's conv)."""
    implementations = conv_implementations(lhs_shape, rhs_shape, dtype, strides, padding)
    return all(name and not name.startswith("ref") for name in implementations)


def conv_usable(lhs: jax.Array, rhs: jax.Array, strides, padding) -> bool:
    """Whether `conv` runs this conv: `usable`, and `has_fast_conv` for it."""
    if not usable(lhs, rhs):
        return False
    conv_args = (tuple(lhs.shape), tuple(rhs.shape), lhs.dtype.name, tuple(strides), tuple(padding))
    fast = has_fast_conv(*conv_args)
    if not fast:
        _log_fallback(*conv_args)
    return fast


@functools.cache
def _log_fallback(lhs_shape, rhs_shape, dtype, strides, padding) -> None:
    # Once per conv: traced again for every compilation, it would repeat the same line.
    implementations = conv_implementations(lhs_shape, rhs_shape, dtype, strides, padding)
    log.debug(
        "oneDNN has no fast %s conv %s x %s on this CPU (forward, input and kernel gradient: %s); "
        "XLA's conv runs it.",
        dtype, lhs_shape, rhs_shape, ", ".join(name or "none" for name in implementations),
    )  # fmt: skip


def _out_shape(lhs_shape, rhs_shape, strides, padding) -> tuple[int, int, int, int]:
    """The NHWC output shape of an NHWC x HWIO conv with explicit (low, high) padding."""
    (n, h, w, _), (kh, kw, _, features) = lhs_shape, rhs_shape
    (pt, pb), (pl, pr) = padding
    return n, (h + pt + pb - kh) // strides[0] + 1, (w + pl + pr - kw) // strides[1] + 1, features


def _call(kind: str, result_shape: Sequence[int], a: jax.Array, b: jax.Array, strides, padding):
    (pad_h_lo, pad_h_hi), (pad_w_lo, pad_w_hi) = padding
    result = jax.ShapeDtypeStruct(tuple(result_shape), a.dtype)
    # vmap (never used by training) runs the conv once per batch element.
    return jax.ffi.ffi_call(_TARGETS[kind], result, vmap_method="sequential")(
        a, b, stride_h=strides[0], stride_w=strides[1], pad_h_lo=pad_h_lo, pad_h_hi=pad_h_hi,
        pad_w_lo=pad_w_lo, pad_w_hi=pad_w_hi,
    )  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
    """An NHWC x HWIO -> NHWC conv (float32 or bfloat16) with explicit (low, high) padding, run
    by oneDNN (where `conv_usable` says it can)."""
    return _call("forward", _out_shape(x.shape, kernel.shape, strides, padding), x, kernel,
                 strides, padding)  # fmt: skip


def _conv_fwd(x, kernel, strides, padding):
    return conv(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, dy):
    x, kernel = residuals
    dx = _call("backward_data", x.shape, dy, kernel, strides, padding)
    dkernel = _call("backward_weights", kernel.shape, x, dy, strides, padding)
    return dx, dkernel


conv.defvjp(_conv_fwd, _conv_bwd)


def channel_sums(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel (last axis) sum(a) and sum(a * b) of two alike tensors, in float32, in one pass
    that reads bfloat16 as it is. Not differentiable: `kernels.batch_norm` has its own VJP."""
    sums = jax.ShapeDtypeStruct((a.shape[-1],), jnp.float32)
    return jax.ffi.ffi_call(_TARGETS["channel_sums"], (sums, sums), vmap_method="sequential")(a, b)
