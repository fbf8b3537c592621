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


# map_coordinates' spline order for each of torchvision's interpolation names.
INTERPOLATION_ORDER = {"bilinear": 1, "nearest": 0}


def rotate(
    image: jax.Array, degrees: float | jax.Array, interpolation: str = "bilinear"
) -> jax.Array:
    """Rotates an HWC image counter-clockwise about its centre, zero fill, float32.

    `interpolation` is "bilinear" or "nearest" (torchvision's RandomRotation default); the
    centre and direction are torchvision's `rotate`.
    """
    height, width = image.shape[:2]
    radians = jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
    cos, sin = jnp.cos(radians), jnp.sin(radians)
    y, x = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
    dy, dx = y - (height - 1) / 2, x - (width - 1) / 2
    # Each output pixel samples the input at its position rotated back (y points down).
    source_y = (height - 1) / 2 + sin * dx + cos * dy
    source_x = (width - 1) / 2 + cos * dx - sin * dy
    order = INTERPOLATION_ORDER[interpolation]

    def sample(channel: jax.Array) -> jax.Array:
        return jax.scipy.ndimage.map_coordinates(
            channel, [source_y, source_x], order=order, mode="constant", cval=0.0
        )

    return jax.vmap(sample, in_axes=2, out_axes=2)(image.astype(jnp.float32))


def random_rotation(
    rng: jax.Array,
    image: jax.Array,
    max_degrees: float,
    min_degrees: float | None = None,
    interpolation: str = "bilinear",
) -> jax.Array:
    """Rotates by an angle drawn uniformly from [min_degrees, max_degrees] (min_degrees None:
    -max_degrees, as torchvision's RandomRotation(max_degrees))."""
    low = -max_degrees if min_degrees is None else min_degrees
    degrees = jax.random.uniform(rng, minval=low, maxval=max_degrees)
    return rotate(image, degrees, interpolation)


def center_crop(image: jax.Array, size: int) -> jax.Array:
    """The central size x size window of an HWC image (torchvision's CenterCrop rounding)."""
    top = round((image.shape[0] - size) / 2)
    left = round((image.shape[1] - size) / 2)
    return image[top : top + size, left : left + size]


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
    resize_crop: bool = True
    flip: bool = True
    rotation: float = 0.0
    rotation_from_zero: bool = False
    rotation_interpolation: str = "bilinear"
    cutout_size: int = 0
    resize_to: int | None = None

    def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """uint8 or float NHWC images in [0, 255] -> float32 normalized NHWC images."""
        images = images.astype(jnp.float32)
        if rng is not None:
            rngs = jax.random.split(rng, images.shape[0])
            images = jax.vmap(self._augment)(rngs, images)
        elif self._trains_at_crop_size(images.shape[1:3]):
            # Evaluation sees what training saw: the crop size, here from the centre.
            images = jax.vmap(center_crop, in_axes=(0, None))(images, self.crop_size)
        if self.resize_to is not None:
            batch, _, _, channels = images.shape
            shape = (batch, self.resize_to, self.resize_to, channels)
            images = jax.image.resize(images, shape, method="bilinear")
        return normalize(images, self.mean, self.std)

    def _trains_at_crop_size(self, size: tuple[int, int]) -> bool:
        return bool(self.crop_size) and not self.resize_crop and size != (self.crop_size,) * 2

    def _augment(self, rng: jax.Array, image: jax.Array) -> jax.Array:
        crop_rng, flip_rng, rotation_rng, cutout_rng = jax.random.split(rng, 4)
        size = image.shape[:2]
        crop_size = (self.crop_size, self.crop_size) if self.crop_size else size
        if self.crop_padding or crop_size != size:
            image = random_crop(crop_rng, image, self.crop_padding, crop_size)
        if crop_size != size and self.resize_crop:
            # Scaled back to the image size, so train and eval (which never crops) sizes agree.
            image = jax.image.resize(image, (*size, image.shape[2]), method="bilinear")
        if self.flip:
            image = random_flip(flip_rng, image)
        if self.rotation:
            low = 0.0 if self.rotation_from_zero else None
            image = random_rotation(
                rotation_rng, image, self.rotation, low, self.rotation_interpolation
            )
        if self.cutout_size:
            image = cutout(cutout_rng, image, self.cutout_size)
        return image


def make_preprocess(
    *,
    mean: Sequence[float],
    std: Sequence[float],
    crop_padding: int = 4,
    crop_size: int | None = None,
    resize_crop: bool = True,
    flip: bool = True,
    rotation: float = 0.0,
    rotation_from_zero: bool = False,
    rotation_interpolation: str = "bilinear",
    cutout_size: int = 0,
    resize_to: int | None = None,
) -> Preprocess:
    """The preprocessing for the train and eval steps.

    With an rng (training) each image gets its own rng and, as enabled: zero-padding by
    `crop_padding` and a random crop of `crop_size` (default: the image size), a random
    left-right flip, a random rotation in [-rotation, rotation] degrees ([0, rotation] if
    `rotation_from_zero`, "bilinear" or "nearest"), and cutout of a `cutout_size` square. A crop
    smaller than the image is resized back to the image size if `resize_crop`; otherwise the
    model trains at `crop_size` and evaluation takes the centre crop of that size. Then, with or
    without an rng, a bilinear resize to `resize_to` (e.g. 224 for ImageNet-pretrained nets on
    CIFAR) and normalization with `mean` and `std`.
    """
    if crop_padding < 0 or (crop_size is not None and crop_size <= 0) or rotation < 0:
        raise ValueError(
            f"crop_padding and rotation must be >= 0 and crop_size > 0, got {crop_padding}, "
            f"{rotation} and {crop_size}"
        )
    if rotation_interpolation not in INTERPOLATION_ORDER:
        raise ValueError(
            f"rotation_interpolation must be one of {', '.join(INTERPOLATION_ORDER)}, got "
            f"{rotation_interpolation!r}"
        )
    return Preprocess(
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        crop_padding=crop_padding,
        crop_size=crop_size,
        resize_crop=resize_crop,
        flip=flip,
        rotation=float(rotation),
        rotation_from_zero=rotation_from_zero,
        rotation_interpolation=rotation_interpolation,
        cutout_size=cutout_size,
        resize_to=resize_to,
    )
