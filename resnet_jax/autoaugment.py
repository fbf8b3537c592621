"""RandAugment and TrivialAugmentWide on the device, as torchvision defines them.

Every op follows `torchvision.transforms.autoaugment._apply_op` on uint8 tensors with the
policies' defaults (nearest interpolation, fill 0): the same inverse affine matrices and sampling
grid, the same truncations back to uint8, the same magnitude tables (`_augmentation_space`, 31
bins) and signs. Images are HWC float32 holding uint8 values; tests/test_autoaugment.py compares
each op with torchvision and states the tolerances.

`apply_policy` augments one image; `augment.Preprocess` vmaps it with one rng per example, so
each example draws its own ops and magnitudes. Under vmap, `lax.switch` on a per-example op index
computes every op and keeps the drawn one; the five geometric ops share one resampling through a
selected affine matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

POLICIES = ("none", "randaugment", "trivialaugment")
# torchvision's op order (the index an op is drawn by).
OPS = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
    "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)  # fmt: skip
SIGNED_OPS = frozenset(OPS[1:10])  # drawn with a random sign
GEOMETRIC_OPS = OPS[1:6]  # resampled through an affine matrix; the rest change pixel values
NUM_MAGNITUDE_BINS = 31


def magnitude_table(policy: str, height: int, width: int) -> np.ndarray:
    """(len(OPS), NUM_MAGNITUDE_BINS) float32: each op's unsigned magnitude by bin, as
    torchvision's `_augmentation_space` (0 for the ops without one)."""
    bins = np.arange(NUM_MAGNITUDE_BINS)

    def linspace(start: float, end: float) -> np.ndarray:
        # torch.linspace's float32 values (a float32 step, then fused multiply-adds from the start
        # up to halfway and from the end after): int() of a translation sees the last bit.
        step = np.float64((np.float32(end) - np.float32(start)) / np.float32(bins.size - 1))
        from_start = np.float64(np.float32(start)) + step * bins
        from_end = np.float64(np.float32(end)) - step * (bins.size - 1 - bins)
        return np.where(bins < bins.size // 2, from_start, from_end).astype(np.float32)

    if policy == "randaugment":
        shear, rotate, colour, posterize_levels = 0.3, 30.0, 0.9, 4
        translate_x, translate_y = 150.0 / 331.0 * width, 150.0 / 331.0 * height
    elif policy == "trivialaugment":
        shear, rotate, colour, posterize_levels = 0.99, 135.0, 0.99, 6
        translate_x = translate_y = 32.0
    else:
        raise ValueError(f"policy must be randaugment or trivialaugment, got {policy!r}")
    posterize_step = np.float32((NUM_MAGNITUDE_BINS - 1) / posterize_levels)
    rows = {
        "ShearX": linspace(0.0, shear),
        "ShearY": linspace(0.0, shear),
        "TranslateX": linspace(0.0, translate_x),
        "TranslateY": linspace(0.0, translate_y),
        "Rotate": linspace(0.0, rotate),
        **{
            name: linspace(0.0, colour) for name in ("Brightness", "Color", "Contrast", "Sharpness")
        },
        "Posterize": 8 - np.round(bins.astype(np.float32) / posterize_step),
        "Solarize": linspace(255.0, 0.0),
    }
    zeros = np.zeros(NUM_MAGNITUDE_BINS, np.float32)
    return np.stack([rows.get(name, zeros) for name in OPS]).astype(np.float32)


def sample_ops(
    rng: jax.Array, policy: str, num_ops: int, magnitude: int, height: int, width: int
) -> tuple[jax.Array, jax.Array]:
    """The ops (indices into OPS) and signed magnitudes one image gets, in order.

    RandAugment: `num_ops` uniform ops at bin `magnitude`; TrivialAugmentWide: one uniform op at a
    uniform bin. A signed op's magnitude is negated with probability 1/2.
    """
    table = jnp.asarray(magnitude_table(policy, height, width))
    signed = jnp.asarray([name in SIGNED_OPS for name in OPS])
    op_rng, bin_rng, sign_rng = jax.random.split(rng, 3)
    count = num_ops if policy == "randaugment" else 1
    ops = jax.random.randint(op_rng, (count,), 0, len(OPS))
    if policy == "randaugment":
        bins = jnp.full((count,), magnitude)
    else:
        bins = jax.random.randint(bin_rng, (count,), 0, NUM_MAGNITUDE_BINS)
    negate = jax.random.bernoulli(sign_rng, shape=(count,)) & signed[ops]
    magnitudes = table[ops, bins]
    return ops, jnp.where(negate, -magnitudes, magnitudes)


def apply_policy(
    rng: jax.Array, image: jax.Array, policy: str, num_ops: int = 2, magnitude: int = 9
) -> jax.Array:
    """One HWC image through RandAugment(num_ops, magnitude) or TrivialAugmentWide.

    Values are rounded to uint8 first (a resized crop is not integral; torchvision's policies take
    uint8), and come out float32 with uint8 values.
    """
    height, width = image.shape[:2]
    image = jnp.clip(jnp.round(image.astype(jnp.float32)), 0, 255)
    ops, magnitudes = sample_ops(rng, policy, num_ops, magnitude, height, width)
    for op, value in zip(ops, magnitudes, strict=True):
        image = apply_op(image, op, value)
    return image


def apply_op(image: jax.Array, op: jax.Array | int, magnitude: jax.Array | float) -> jax.Array:
    """OPS[op] at the signed `magnitude` on one HWC image of uint8 values (float32)."""
    op = jnp.asarray(op)
    magnitude = jnp.asarray(magnitude, jnp.float32)
    # An op either moves pixels or changes their values: both are computed from the input and
    # the right one kept (chaining them made XLA recompute the resampling in every pixel op).
    moved = affine_nearest(image, _inverse_affine_matrix(op, magnitude, *image.shape[:2]))
    recoloured = jax.lax.switch(op, _PIXEL_OPS, image, magnitude)
    is_geometric = jnp.isin(op, jnp.asarray([OPS.index(name) for name in GEOMETRIC_OPS]))
    return jnp.where(is_geometric, moved, recoloured)


def _inverse_affine_matrix(
    op: jax.Array, magnitude: jax.Array, height: int, width: int
) -> jax.Array:
    """The 2x3 matrix from output to input pixel positions (centred coordinates) of the geometric
    op `op` (the identity for the others), as torchvision's `_get_inverse_affine_matrix`."""
    is_op = {name: op == OPS.index(name) for name in OPS}
    zero = jnp.zeros((), jnp.float32)
    shifted = jnp.trunc(magnitude)  # torchvision translates by int(magnitude)
    # Shears are about the top-left corner (center=[0, 0]); the rest about the image centre.
    is_shear = is_op["ShearX"] | is_op["ShearY"]
    cx = jnp.where(is_shear, -width / 2, 0.0)
    cy = jnp.where(is_shear, -height / 2, 0.0)
    angle = jnp.where(is_op["Rotate"], -jnp.deg2rad(magnitude), zero)  # rotate() negates it
    tx = jnp.where(is_op["TranslateX"], shifted, zero)
    ty = jnp.where(is_op["TranslateY"], shifted, zero)
    sx = jnp.where(is_op["ShearX"], jnp.arctan(magnitude), zero)
    sy = jnp.where(is_op["ShearY"], jnp.arctan(magnitude), zero)
    a = jnp.cos(angle - sy) / jnp.cos(sy)
    b = -jnp.cos(angle - sy) * jnp.tan(sx) / jnp.cos(sy) - jnp.sin(angle)
    c = jnp.sin(angle - sy) / jnp.cos(sy)
    d = -jnp.sin(angle - sy) * jnp.tan(sx) / jnp.cos(sy) + jnp.cos(angle)
    offset_x = d * (-cx - tx) + b * (cy + ty) + cx
    offset_y = -c * (-cx - tx) + a * (-cy - ty) + cy
    return jnp.stack([jnp.stack([d, -b, offset_x]), jnp.stack([-c, a, offset_y])])


def affine_nearest(image: jax.Array, matrix: jax.Array) -> jax.Array:
    """Resamples an HWC image at `matrix` @ (x, y, 1) for each output pixel centre (x, y relative
    to the image centre), nearest neighbour, zero outside: torchvision's affine grid and
    `grid_sample(mode="nearest", align_corners=False)`."""
    height, width = image.shape[:2]
    y = jnp.arange(height, dtype=jnp.float32)[:, None] - height / 2 + 0.5
    x = jnp.arange(width, dtype=jnp.float32)[None, :] - width / 2 + 0.5
    # The grid in grid_sample's [-1, 1] units, then back to pixel indices, in torchvision's order.
    theta_x = matrix[0] / (width / 2)
    theta_y = matrix[1] / (height / 2)
    grid_x = x * theta_x[0] + y * theta_x[1] + theta_x[2]
    grid_y = x * theta_y[0] + y * theta_y[1] + theta_y[2]
    cols = jnp.round(((grid_x + 1) * width - 1) / 2).astype(jnp.int32)  # round half to even
    rows = jnp.round(((grid_y + 1) * height - 1) / 2).astype(jnp.int32)
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    sampled = image[jnp.clip(rows, 0, height - 1), jnp.clip(cols, 0, width - 1)]
    return jnp.where(inside[..., None], sampled, 0.0)


def _blend(image: jax.Array, degenerate: jax.Array, magnitude: jax.Array) -> jax.Array:
    """torchvision's _blend at ratio 1 + magnitude: clamp, then .to(uint8), which truncates."""
    # The degenerate's weight is -magnitude as torchvision computes 1 - ratio: in double.
    mixed = (1.0 + magnitude) * image - magnitude * degenerate
    return jnp.floor(jnp.clip(mixed, 0.0, 255.0))


def _grayscale(image: jax.Array) -> jax.Array:
    if image.shape[-1] == 1:  # already gray: torchvision's rgb_to_grayscale returns it as it is
        return image
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    return jnp.floor(0.2989 * r + 0.587 * g + 0.114 * b)[..., None]  # uint8, truncated


def brightness(image: jax.Array, magnitude: jax.Array) -> jax.Array:
    return _blend(image, jnp.zeros_like(image), magnitude)


def color(image: jax.Array, magnitude: jax.Array) -> jax.Array:
    if image.shape[-1] == 1:  # a gray image has no saturation: torchvision (and PIL) keep it
        return image
    return _blend(image, _grayscale(image), magnitude)


def contrast(image: jax.Array, magnitude: jax.Array) -> jax.Array:
    return _blend(image, jnp.mean(_grayscale(image)), magnitude)


def sharpness(image: jax.Array, magnitude: jax.Array) -> jax.Array:
    """Blend with the image smoothed by [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 (borders kept)."""
    height, width = image.shape[:2]
    weights = np.full((3, 3), 1.0, np.float32)
    weights[1, 1] = 5.0
    weights /= weights.sum()
    smoothed = sum(
        weights[dy, dx] * image[dy : dy + height - 2, dx : dx + width - 2]
        for dy in range(3)
        for dx in range(3)
    )
    blurred = image.at[1:-1, 1:-1].set(jnp.round(smoothed))
    return _blend(image, blurred, magnitude)


def posterize(image: jax.Array, bits: jax.Array) -> jax.Array:
    """Keeps the top `bits` bits of each value."""
    quantum = 2.0 ** (8 - bits)
    return jnp.floor(image / quantum) * quantum


def solarize(image: jax.Array, threshold: jax.Array) -> jax.Array:
    """Inverts the values at or above `threshold`."""
    return jnp.where(image >= threshold, 255.0 - image, image)


def autocontrast(image: jax.Array, magnitude: jax.Array | None = None) -> jax.Array:
    """Stretches each channel to [0, 255] (a constant channel is left as it is)."""
    del magnitude
    low = image.min(axis=(0, 1))
    high = image.max(axis=(0, 1))
    constant = high == low
    # torch evaluates `255 / x` as reciprocal(x) * 255, which rounds differently.
    scale = jnp.where(constant, 1.0, 1.0 / jnp.where(constant, 1.0, high - low) * 255.0)
    low = jnp.where(constant, 0.0, low)
    return jnp.floor(jnp.clip((image - low) * scale, 0.0, 255.0))


def equalize(image: jax.Array, magnitude: jax.Array | None = None) -> jax.Array:
    """Histogram equalization of each channel, torchvision's (PIL's) lookup table."""
    del magnitude
    return jax.vmap(_equalize_channel, in_axes=2, out_axes=2)(image)


def _equalize_channel(channel: jax.Array) -> jax.Array:
    values = channel.astype(jnp.int32).ravel()
    histogram = jnp.zeros(256, jnp.int32).at[values].add(1)
    # All pixels but those of the last non-empty bin, spread over 255 levels.
    step = (values.size - histogram[values.max()]) // 255
    table = (jnp.cumsum(histogram) + step // 2) // jnp.maximum(step, 1)
    table = jnp.clip(jnp.concatenate([jnp.zeros(1, jnp.int32), table[:-1]]), 0, 255)
    equalized = table[values].reshape(channel.shape).astype(jnp.float32)
    return jnp.where(step == 0, channel, equalized)


def _keep(image: jax.Array, magnitude: jax.Array) -> jax.Array:
    del magnitude
    return image


_PIXEL_FUNCTIONS = {
    "Brightness": brightness,
    "Color": color,
    "Contrast": contrast,
    "Sharpness": sharpness,
    "Posterize": posterize,
    "Solarize": solarize,
    "AutoContrast": autocontrast,
    "Equalize": equalize,
}
# Indexed like OPS (the geometric ops' entries go unused).
_PIXEL_OPS = tuple(_PIXEL_FUNCTIONS.get(name, _keep) for name in OPS)
