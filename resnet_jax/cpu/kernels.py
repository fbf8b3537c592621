"""The CPU kernel set that `models.get_model(kernels="cpu")` plugs into the ResNet, and the choice
of kernel set (`kernel_modules`).

`Conv`, `BatchNorm` and `max_pool` stand in for `nn.Conv`, `layers.BatchNorm` and `nn.max_pool`: the
same variables (names, shapes, collections) and the same numbers up to float rounding, computed
in ways XLA:CPU runs faster. Each piece says why; docs/PERFORMANCE.md has what each one won.
Off a single CPU device the oneDNN shim steps aside and XLA's own ops run (XLA cannot partition
a custom call over several devices).
"""

from __future__ import annotations

import functools
import platform
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax import layers
from resnet_jax.cpu import onednn

Dtype = Any
Padding = tuple[tuple[int, int], tuple[int, int]]

NHWC = ("NHWC", "HWIO", "NHWC")
# "xla": plain Flax; "cpu": this module's kernel set; "auto": the CPU set where it was measured.
KERNELS = ("auto", "xla", "cpu")


def materialized(x: jax.Array) -> jax.Array:
    """`x`, written once into its own buffer (on the CPU backend; elsewhere `x` as is).

    XLA:CPU runs a conv's kernel gradient on a channels-major copy of the conv's input, and fuses
    the BN, ReLU and residual adds that produced that input into the copy, recomputing them in a
    transposed, cache-hostile order. A matmul by the identity is a library call that XLA does not
    fuse through, so the copy becomes a plain transpose of a stored array. Bit-exact for finite
    `x` (each output is x_j * 1 plus exact zeros); an inf would make its pixel's other channels NaN.
    float32 only, where it was measured: a bfloat16 conv reaches XLA only on a CPU without
    AVX-512 (elsewhere oneDNN runs it), and there the bfloat16 matmul cost more than it saved.
    """
    if jax.default_backend() != "cpu" or x.dtype != jnp.float32:
        return x
    return _identity_matmul(x)


@jax.custom_vjp
def _identity_matmul(x: jax.Array) -> jax.Array:
    return jnp.dot(x, jnp.eye(x.shape[-1], dtype=x.dtype))


def _identity_matmul_fwd(x: jax.Array) -> tuple[jax.Array, None]:
    return _identity_matmul(x), None


def _identity_matmul_bwd(_: None, cotangent: jax.Array) -> tuple[jax.Array]:
    # The gradient passes straight through: differentiating the matmul would add a second one.
    return (cotangent,)


_identity_matmul.defvjp(_identity_matmul_fwd, _identity_matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _xla_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding):
    """XLA's NHWC conv whose kernel gradient reads a `materialized` copy of its input.

    Only the backward pass materializes, so a conv that takes no kernel gradient (evaluation,
    frozen stages) pays nothing for it: XLA drops the unused copy with the unused gradient.
    """
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC)


def _xla_conv_fwd(x, kernel, strides, padding):
    return _xla_conv(x, kernel, strides, padding), (x, kernel)


def _xla_conv_bwd(strides, padding, residuals, dy):
    x, kernel = residuals
    conv = functools.partial(lax.conv_general_dilated, window_strides=strides, padding=padding,
                             dimension_numbers=NHWC)  # fmt: skip
    _, vjp = jax.vjp(conv, materialized(x), kernel)
    return vjp(dy)


_xla_conv.defvjp(_xla_conv_fwd, _xla_conv_bwd)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """`lax.conv_general_dilated` for `nn.Conv`, with a faster path for a plain 2-D NHWC conv.

    A conv that is 1x1, or whose window has more taps than its input or output feature map has
    pixels, is computed as one matmul over its patches (im2col; for a 1x1 conv the patches are the
    strided input itself): XLA:CPU swaps the operands of such a conv (and of its input-gradient
    conv), which sends it to a slow generic kernel, and a 1x1 conv's kernel gradient as a dot is a
    plain GEMM where as a conv XLA first transposes the activations. Taps that only ever see
    padding are dropped (they add exact zeros), so the result is the same sum in another order.
    Every other such conv runs on oneDNN where `onednn.conv_usable` (the CPU has a fast oneDNN
    kernel for it), else on XLA's conv with its kernel gradient on a `materialized` input.
    """
    conv = functools.partial(
        lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, precision=precision, **kwargs,
    )  # fmt: skip
    if (
        lhs.ndim != 4
        or kwargs
        or precision is not None
        or feature_group_count != 1
        or isinstance(padding, str)
        or any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
        or dimension_numbers != lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
    ):
        return conv()
    (_, height, width, channels), (kh, kw, _, features) = lhs.shape, rhs.shape
    (pt, pb), (pl, pr) = padding
    if min(pt, pb, pl, pr) < 0:
        return conv()
    sh, sw = window_strides
    out_h, out_w = (height + pt + pb - kh) // sh + 1, (width + pl + pr - kw) // sw + 1
    if kh * kw > 1 and kh * kw <= min(height * width, out_h * out_w):
        if onednn.conv_usable(lhs, rhs, (sh, sw), ((pt, pb), (pl, pr))):
            return onednn.conv(lhs, rhs, (sh, sw), ((pt, pb), (pl, pr)))
        return _xla_conv(lhs, rhs, (sh, sw), ((pt, pb), (pl, pr)))

    def useful(size: int, out: int, stride: int, pad: int, taps: int) -> range:
        used = [k for k in range(taps) if any(0 <= o * stride + k - pad < size for o in range(out))]
        return range(used[0], used[-1] + 1)

    rows, cols = useful(height, out_h, sh, pt, kh), useful(width, out_w, sw, pl, kw)
    x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    patches = jnp.concatenate(
        [x[:, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw] for i in rows
         for j in cols],
        axis=-1,
    )  # fmt: skip
    kernel = rhs[rows.start : rows.stop, cols.start : cols.stop].reshape(-1, features)
    taps = len(rows) * len(cols) * channels
    # Accumulated in float32 and rounded once to the operands' type: asked for explicitly, a bf16
    # dot's kernel gradient comes out HWIO on XLA:CPU instead of transposed and copied back in a
    # strided loop. float32 is unchanged.
    wide = jnp.promote_types(lhs.dtype, jnp.float32)
    y = jnp.dot(patches.reshape(-1, taps), kernel, preferred_element_type=wide)
    return y.astype(lhs.dtype).reshape(lhs.shape[0], out_h, out_w, features)


# nn.Conv computing through the hook above: the same module, variables and numbers.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


def _pool_taps(xp: jax.Array, window: Sequence[int], strides: Sequence[int], out: Sequence[int]):
    """The strided views of the padded input, one per window tap, in row-major window order."""
    (kh, kw), (sh, sw), (oh, ow) = window, strides, out
    return [
        (i, j, xp[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw])
        for i in range(kh)
        for j in range(kw)
    ]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int], padding: Padding):
    """`nn.max_pool` (NHWC, explicit padding) as a max over the window's strided views.

    The gradient goes to the first maximum of each window in row-major order, as flax's
    (select-and-scatter) and torch's do. On XLA:CPU the reduce-window and its scatter gradient
    cost far more than the views and masks do.
    """
    return _max_pool_fwd(x, window, strides, padding)[0]


def _max_pool_fwd(x, window, strides, padding):
    (pt, pb), (pl, pr) = padding
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=-jnp.inf)
    out = ((xp.shape[1] - window[0]) // strides[0] + 1, (xp.shape[2] - window[1]) // strides[1] + 1)
    y = functools.reduce(jnp.maximum, [tap for _, _, tap in _pool_taps(xp, window, strides, out)])
    return y, (x, y)


def _max_pool_bwd(window, strides, padding, residuals, dy):
    x, y = residuals
    (pt, pb), (pl, pr) = padding
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=-jnp.inf)
    (sh, sw), (oh, ow) = strides, y.shape[1:3]
    # Overlapping windows add up to 4 gradients per pixel: summed in float32 and rounded once (a
    # bf16 sum is rounded after every add, and XLA:CPU spends a convert pair on each).
    dy_wide = dy.astype(jnp.promote_types(dy.dtype, jnp.float32))
    taken = jnp.zeros(y.shape, bool)
    dxp = jnp.zeros(xp.shape, dy_wide.dtype)
    zero = jnp.zeros((), dy_wide.dtype)
    for i, j, tap in _pool_taps(xp, window, strides, (oh, ow)):
        hit = (tap == y) & ~taken
        taken = taken | hit
        config = [
            (0, 0, 0),
            (i, xp.shape[1] - i - sh * (oh - 1) - 1, sh - 1),
            (j, xp.shape[2] - j - sw * (ow - 1) - 1, sw - 1),
            (0, 0, 0),
        ]
        dxp = dxp + lax.pad(jnp.where(hit, dy_wide, zero), zero, config)
    return (dxp[:, pt : pt + x.shape[1], pl : pl + x.shape[2]].astype(dy.dtype),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def channel_sums(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel (last axis) sum(a) and sum(a * b) over every other axis, in float32 or wider.

    On one CPU device, the shim's single pass (`onednn.channel_sums`), which reads bfloat16 as it
    is where XLA:CPU first writes a float32 copy. Elsewhere jnp sums, which XLA partitions over a
    mesh.
    """
    if onednn.usable(a, b):
        return onednn.channel_sums(a, b)
    wide = jnp.promote_types(a.dtype, jnp.float32)
    a, b = a.astype(wide), b.astype(wide)
    axes = tuple(range(a.ndim - 1))
    return jnp.sum(a, axes), jnp.sum(a * b, axes)


def _over_devices(sums: tuple[jax.Array, jax.Array], count: int, axis_name: str | None):
    """The sums and their example count over every device of `axis_name` (pmap), if any."""
    if axis_name is None:
        return sums, count
    return lax.psum(sums, axis_name), count * lax.psum(1, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, axis_name: str | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode batch norm over every axis but the last: (y, batch mean, batch variance).

    The numbers of flax's BatchNorm: float32 (or wider) statistics E[x] and E[x^2] - E[x]^2 over
    the batch of every device of `axis_name`, y = (x - mean) * rsqrt(var + epsilon) * scale + bias
    in x's dtype. Its VJP keeps x as the one full-size residual (plain autodiff also keeps the
    centered activations) and takes its sums from `channel_sums` as the forward pass does.
    """
    return _batch_norm_fwd(x, scale, bias, epsilon, axis_name)[0]


def _normalize(x, scale, bias, mean, inv):
    return (x - mean) * (inv * scale) + bias


def _batch_norm_fwd(x, scale, bias, epsilon, axis_name):
    sums, count = _over_devices(channel_sums(x, x), x.size // x.shape[-1], axis_name)
    mean = sums[0] / count
    var = jnp.maximum(0.0, sums[1] / count - mean * mean)
    inv = lax.rsqrt(var + epsilon)
    y = _normalize(x, scale, bias, mean, inv)
    return (y.astype(x.dtype), mean, var), (x, scale, bias, mean, inv)


def _batch_norm_bwd(epsilon, axis_name, residuals, cotangents):
    x, scale, bias, mean, inv = residuals
    dy, dmean, dvar = cotangents
    local = channel_sums(dy, x)  # sum(dy), sum(dy * x): this device's share
    dbias, dscale = local[0], (local[1] - mean * local[0]) * inv  # dscale = sum(dy * xhat)
    (dy_sum, dy_x_sum), count = _over_devices(local, x.size // x.shape[-1], axis_name)
    dy_xhat_mean = (dy_x_sum - mean * dy_sum) * inv / count
    centered = x - mean
    dx = (scale * inv) * (dy - dy_sum / count - centered * (inv * dy_xhat_mean))
    dx = dx + dmean / count + (2.0 / count) * dvar * centered  # through the returned statistics
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class BatchNorm(layers.BatchNorm):
    """`layers.BatchNorm` (its variables, statistics and numbers), trained through `batch_norm`."""

    def normalize_batch(
        self, x: jax.Array, scale: jax.Array, bias: jax.Array, axis_name: str | None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(y, batch mean, biased batch variance), from `batch_norm`'s one-pass sums and VJP."""
        return batch_norm(x, scale, bias, self.epsilon, axis_name)


def resolve_kernels(kernels: str) -> str:
    """The kernel set, "xla" or "cpu", that `kernels` ("auto", "xla" or "cpu") means here.

    "auto" is the CPU set only where it was measured faster than plain Flax: a single CPU device
    of an x86-64 Linux machine (elsewhere, e.g. aarch64 or macOS, plain Flax). It asks JAX for its
    backend, so call it when JAX may start one.
    """
    if kernels not in KERNELS:
        valid = ", ".join(KERNELS)
        raise ValueError(f"Unknown kernel set {kernels!r}; valid choices are: {valid}.")
    if kernels != "auto":
        return kernels
    on_one_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
    measured_here = sys.platform == "linux" and platform.machine().lower() in ("x86_64", "amd64")
    return "cpu" if on_one_cpu and measured_here else "xla"


def kernel_modules(kernels: str) -> dict[str, Any]:
    """The `conv`, `norm` and `pool` fields of a `models.ResNet` on the kernel set `kernels`."""
    if resolve_kernels(kernels) == "cpu":
        return dict(conv=Conv, norm=BatchNorm, pool=max_pool)
    return dict(conv=nn.Conv, norm=layers.BatchNorm, pool=nn.max_pool)
