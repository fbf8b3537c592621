"""On-device augmentation and normalization, in pure jnp so it compiles into the train step.

The per-image ops take one HWC image and an rng; `make_preprocess` vmaps them over a batch with
one rng per example and returns the `preprocess(images, rng=None)` that the train and eval steps
call (rng=None at evaluation: no random op, only the deterministic resize and normalize).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

# Per-channel statistics of the training images, in [0, 1] units.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)  # per-pixel std; the often-copied (0.2023, ...) is not
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """uint8 or float images in [0, 255] -> float32 (x / 255 - mean) / std, per channel."""
    scaled = images.astype(jnp.float32) / 255.0
    return (scaled - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def random_crop(
    rng: jax.Array, image: jax.Array, padding: int, crop_size: int | tuple[int, int]
) -> jax.Array:
    """Zero-pads an HWC image by `padding` on each side, then crops a random window of crop_size
    (an int for a square, or (height, width))."""
    crop_height, crop_width = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    max_offsets = jnp.array(padded.shape[:2]) - jnp.array([crop_height, crop_width])
    top, left = jax.random.randint(rng, (2,), 0, max_offsets + 1)
    return jax.lax.dynamic_slice(padded, (top, left, 0), (crop_height, crop_width, image.shape[2]))


def random_flip(rng: jax.Array, image: jax.Array) -> jax.Array:
    """Mirrors an HWC image left-right with probability 1/2."""
    return jnp.where(jax.random.bernoulli(rng), image[:, ::-1], image)


def rotate(image: jax.Array, degrees: float | jax.Array) -> jax.Array:
    """Rotates an HWC image counter-clockwise about its centre: bilinear, zero fill, float32."""
    height, width = image.shape[:2]
    radians = jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
    cos, sin = jnp.cos(radians), jnp.sin(radians)
    y, x = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
    dy, dx = y - (height - 1) / 2, x - (width - 1) / 2
    # Each output pixel samples the input at its position rotated back (y points down).
    source_y = (height - 1) / 2 + sin * dx + cos * dy
    source_x = (width - 1) / 2 + cos * dx - sin * dy

    def sample(channel: jax.Array) -> jax.Array:
        return jax.scipy.ndimage.map_coordinates(
            channel, [source_y, source_x], order=1, mode="constant", cval=0.0
        )

    return jax.vmap(sample, in_axes=2, out_axes=2)(image.astype(jnp.float32))


def random_rotation(rng: jax.Array, image: jax.Array, max_degrees: float) -> jax.Array:
    """Rotates by an angle drawn uniformly from [-max_degrees, max_degrees]."""
    degrees = jax.random.uniform(rng, minval=-max_degrees, maxval=max_degrees)
    return rotate(image, degrees)


def cutout(rng: jax.Array, image: jax.Array, size: int) -> jax.Array:
    """Zeroes a size x size square centred on a random pixel; it may hang over the border."""
    height, width = image.shape[:2]
    center_y, center_x = jax.random.randint(rng, (2,), 0, jnp.array([height, width]))
    top, left = center_y - size // 2, center_x - size // 2
    rows = jnp.arange(height)[:, None, None]
    cols = jnp.arange(width)[None, :, None]
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return jnp.where(inside, jnp.zeros_like(image), image)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """`preprocess(images, rng=None)`: augment (given an rng), resize, normalize to float32.

    A frozen dataclass rather than a closure so that equal settings compare and hash equal, which
    lets it sit in a static field of the train state without forcing a recompile.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 4
    crop_size: int | None = None
    flip: bool = True
    rotation: float = 0.0
    cutout_size: int = 0
    resize_to: int | None = None

    def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """uint8 or float NHWC images in [0, 255] -> float32 normalized NHWC images."""
        images = images.astype(jnp.float32)
        if rng is not None:
            rngs = jax.random.split(rng, images.shape[0])
            images = jax.vmap(self._augment)(rngs, images)
        if self.resize_to is not None:
            batch, _, _, channels = images.shape
            shape = (batch, self.resize_to, self.resize_to, channels)
            images = jax.image.resize(images, shape, method="bilinear")
        return normalize(images, self.mean, self.std)

    def _augment(self, rng: jax.Array, image: jax.Array) -> jax.Array:
        crop_rng, flip_rng, rotation_rng, cutout_rng = jax.random.split(rng, 4)
        size = image.shape[:2]
        crop_size = (self.crop_size, self.crop_size) if self.crop_size else size
        if self.crop_padding or crop_size != size:
            image = random_crop(crop_rng, image, self.crop_padding, crop_size)
        if crop_size != size:
            # Scaled back to the image size, so train and eval (which never crops) sizes agree.
            image = jax.image.resize(image, (*size, image.shape[2]), method="bilinear")
        if self.flip:
            image = random_flip(flip_rng, image)
        if self.rotation:
            image = random_rotation(rotation_rng, image, self.rotation)
        if self.cutout_size:
            image = cutout(cutout_rng, image, self.cutout_size)
        return image


def make_preprocess(
    *,
    mean: Sequence[float],
    std: Sequence[float],
    crop_padding: int = 4,
    crop_size: int | None = None,
    flip: bool = True,
    rotation: float = 0.0,
    cutout_size: int = 0,
    resize_to: int | None = None,
) -> Preprocess:
    """The preprocessing for the train and eval steps.

    With an rng (training) each image gets its own rng and, as enabled: zero-padding by
    `crop_padding` and a random crop of `crop_size` (default: the image size; a smaller crop is
    resized back to the image size, so evaluation, which never crops, sees the same size), a
    random left-right flip, a random rotation in [-rotation, rotation] degrees, and cutout of a
    `cutout_size` square. Then, with or without an rng, a bilinear resize to `resize_to` (e.g.
    224 for ImageNet-pretrained nets on CIFAR) and normalization with `mean` and `std`.
    """
    if crop_padding < 0 or (crop_size is not None and crop_size <= 0) or rotation < 0:
        raise ValueError(
            f"crop_padding and rotation must be >= 0 and crop_size > 0, got {crop_padding}, "
            f"{rotation} and {crop_size}"
        )
    return Preprocess(
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        crop_padding=crop_padding,
        crop_size=crop_size,
        flip=flip,
        rotation=float(rotation),
        cutout_size=cutout_size,
        resize_to=resize_to,
    )
