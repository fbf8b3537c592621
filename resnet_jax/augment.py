"""On-device augmentation and normalization, in pure jnp so it compiles into the train step.

The per-image ops take one HWC image and an rng; `make_preprocess` vmaps them over a batch with
one rng per example and returns the `preprocess(images, rng=None)` that the train and eval steps
call (rng=None at evaluation: no random op, only the deterministic resize and normalize).
`make_mix` returns the batch-level mixup/CutMix that the train step applies after it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from resnet_jax import autoaugment

# Per-channel statistics of the training images, in [0, 1] units.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)  # per-pixel std; the often-copied (0.2023, ...) is not
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The named statistics (RGB only), by their augment.normalization names.
NAMED_STATS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """uint8 or float images in [0, 255] -> float32 (x / 255 - mean) / std, per channel."""
    if not len(mean) == len(std) == images.shape[-1]:  # else they would broadcast to 3 channels
        raise ValueError(
            f"mean and std need one value per channel of the {images.shape[-1]}-channel images, "
            f"got {len(mean)} and {len(std)}"
        )
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


# Random erasing's fills: 0 (the mean, after normalization), one normal(0, 1) value per channel,
# or one per pixel and channel (timm's modes).
ERASING_MODES = ("const", "rand", "pixel")
ERASING_ATTEMPTS = 10  # boxes drawn per image; timm and torchvision try 10 times for one that fits


def random_erasing(
    rng: jax.Array,
    image: jax.Array,
    probability: float,
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
    mode: str = "const",
) -> jax.Array:
    """With `probability`, fills one random box of an HWC image, as timm's RandomErasing.

    The box's area is U(min_area, max_area) x the image's, its aspect (height / width)
    log-uniform in [min_aspect, 1 / min_aspect], its sides rounded to pixels; of
    ERASING_ATTEMPTS such boxes the first smaller than the image in both sides is placed
    uniformly inside it, and nothing is erased if none is. `mode` is one of ERASING_MODES.
    """
    height, width, channels = image.shape
    apply_rng, area_rng, aspect_rng, offset_rng, fill_rng = jax.random.split(rng, 5)
    shape = (ERASING_ATTEMPTS,)
    areas = jax.random.uniform(area_rng, shape, minval=min_area, maxval=max_area) * height * width
    log_min_aspect = math.log(min_aspect)  # aspects are log-uniform, symmetric about 1
    aspects = jnp.exp(
        jax.random.uniform(aspect_rng, shape, minval=log_min_aspect, maxval=-log_min_aspect)
    )
    box_heights = jnp.round(jnp.sqrt(areas * aspects)).astype(jnp.int32)
    box_widths = jnp.round(jnp.sqrt(areas / aspects)).astype(jnp.int32)
    fits = (box_heights < height) & (box_widths < width)
    first = jnp.argmax(fits)  # the first box that fits (0 if none does: then `erase` is False)
    box_height, box_width = box_heights[first], box_widths[first]
    erase = jax.random.bernoulli(apply_rng, probability) & fits[first]
    max_offsets = jnp.array([height - box_height, width - box_width])
    top, left = jax.random.randint(offset_rng, (2,), 0, max_offsets + 1)
    rows = jnp.arange(height)[:, None, None]
    cols = jnp.arange(width)[None, :, None]
    bottom, right = top + box_height, left + box_width
    inside = erase & (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    if mode == "pixel":
        fill = jax.random.normal(fill_rng, image.shape, image.dtype)
    elif mode == "rand":
        fill = jax.random.normal(fill_rng, (1, 1, channels), image.dtype)
    else:
        fill = jnp.zeros((1, 1, channels), image.dtype)
    return jnp.where(inside, fill, image)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """`preprocess(images, rng=None)`: augment (given an rng), resize, normalize to float32, erase.

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
    policy: str = "none"
    policy_num_ops: int = 2
    policy_magnitude: int = 9
    erasing_prob: float = 0.0
    erasing_min_area: float = 0.02
    erasing_max_area: float = 1 / 3
    erasing_min_aspect: float = 0.3
    erasing_mode: str = "const"

    def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """uint8 or float NHWC images in [0, 255] -> float32 normalized NHWC images."""
        images = images.astype(jnp.float32)
        erasing_rng = None
        if rng is not None and self.erasing_prob:
            # A key split off only when erasing is on, so that runs without it draw as before.
            rng, erasing_rng = jax.random.split(rng)
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
        images = normalize(images, self.mean, self.std)
        if erasing_rng is not None:
            # After normalization, as timm and torchvision's references: "const" fills the mean.
            rngs = jax.random.split(erasing_rng, images.shape[0])
            images = jax.vmap(self._erase)(rngs, images)
        return images

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
        if self.policy != "none":
            # After crop and flip, as torchvision's references; a key split off the cutout's, so
            # that runs without a policy draw as before.
            cutout_rng, policy_rng = jax.random.split(cutout_rng)
            image = autoaugment.apply_policy(
                policy_rng, image, self.policy, self.policy_num_ops, self.policy_magnitude
            )
        if self.rotation:
            low = 0.0 if self.rotation_from_zero else None
            image = random_rotation(
                rotation_rng, image, self.rotation, low, self.rotation_interpolation
            )
        if self.cutout_size:
            image = cutout(cutout_rng, image, self.cutout_size)
        return image

    def _erase(self, rng: jax.Array, image: jax.Array) -> jax.Array:
        return random_erasing(
            rng,
            image,
            self.erasing_prob,
            self.erasing_min_area,
            self.erasing_max_area,
            self.erasing_min_aspect,
            self.erasing_mode,
        )


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
    policy: str = "none",
    policy_num_ops: int = 2,
    policy_magnitude: int = 9,
    erasing_prob: float = 0.0,
    erasing_min_area: float = 0.02,
    erasing_max_area: float = 1 / 3,
    erasing_min_aspect: float = 0.3,
    erasing_mode: str = "const",
) -> Preprocess:
    """The preprocessing for the train and eval steps.

    With an rng (training) each image gets its own rng and, as enabled: zero-padding by
    `crop_padding` and a random crop of `crop_size` (default: the image size), a random
    left-right flip, `policy` ("randaugment" with `policy_num_ops` ops at magnitude bin
    `policy_magnitude` of 0..30, or "trivialaugment"; see autoaugment.py), a random rotation in
    [-rotation, rotation] degrees ([0, rotation] if `rotation_from_zero`, "bilinear" or
    "nearest"), and cutout of a `cutout_size` square. A crop
    smaller than the image is resized back to the image size if `resize_crop`; otherwise the
    model trains at `crop_size` and evaluation takes the centre crop of that size. Then, with or
    without an rng, a bilinear resize to `resize_to` (e.g. 224 for ImageNet-pretrained nets on
    CIFAR) and normalization with `mean` and `std`. Last, with an rng, random erasing of one box
    with probability `erasing_prob` (0 = off; see `random_erasing` for the other settings).
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
    if policy not in autoaugment.POLICIES:
        raise ValueError(f"policy must be one of {', '.join(autoaugment.POLICIES)}, got {policy!r}")
    if policy_num_ops < 0 or not 0 <= policy_magnitude < autoaugment.NUM_MAGNITUDE_BINS:
        raise ValueError(
            f"policy_num_ops must be >= 0 and policy_magnitude in [0, "
            f"{autoaugment.NUM_MAGNITUDE_BINS - 1}], got {policy_num_ops} and {policy_magnitude}"
        )
    if not (
        0 <= erasing_prob <= 1
        and 0 < erasing_min_area <= erasing_max_area <= 1
        and 0 < erasing_min_aspect <= 1
    ):
        raise ValueError(
            f"erasing_prob must be in [0, 1], 0 < erasing_min_area <= erasing_max_area <= 1 and "
            f"erasing_min_aspect in (0, 1], got {erasing_prob}, {erasing_min_area}, "
            f"{erasing_max_area} and {erasing_min_aspect}"
        )
    if erasing_mode not in ERASING_MODES:
        raise ValueError(
            f"erasing_mode must be one of {', '.join(ERASING_MODES)}, got {erasing_mode!r}"
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
        policy=policy,
        policy_num_ops=policy_num_ops,
        policy_magnitude=policy_magnitude,
        erasing_prob=float(erasing_prob),
        erasing_min_area=float(erasing_min_area),
        erasing_max_area=float(erasing_max_area),
        erasing_min_aspect=float(erasing_min_aspect),
        erasing_mode=erasing_mode,
    )


def mixup(images: jax.Array, lam: jax.Array) -> jax.Array:
    """lam * images + (1 - lam) * the batch reversed (example i with example n - 1 - i)."""
    return lam * images + (1.0 - lam) * images[::-1]


def cutmix(rng: jax.Array, images: jax.Array, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pastes one box of the reversed batch into every image, as timm's `rand_bbox`: sides
    sqrt(1 - lam) of the image's, a uniform centre, clipped at the border.

    Returns the images and lam corrected to the fraction of each image left uncovered (timm's
    correct_lam), which the clipping makes larger than the drawn lam.
    """
    height, width = images.shape[1:3]
    ratio = jnp.sqrt(1.0 - lam)
    half_height = (height * ratio).astype(jnp.int32) // 2
    half_width = (width * ratio).astype(jnp.int32) // 2
    center_y, center_x = jax.random.randint(rng, (2,), 0, jnp.array([height, width]))
    top = jnp.clip(center_y - half_height, 0, height)
    bottom = jnp.clip(center_y + half_height, 0, height)
    left = jnp.clip(center_x - half_width, 0, width)
    right = jnp.clip(center_x + half_width, 0, width)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    mixed = jnp.where(inside[None, :, :, None], images[::-1], images)
    box_area = (bottom - top) * (right - left)
    return mixed, 1.0 - box_area / (height * width)


def mix_targets(labels: jax.Array, lam: jax.Array, num_classes: int) -> jax.Array:
    """The soft targets of a mixed batch: lam * one_hot(labels) + (1 - lam) * one_hot(reversed)."""
    one_hot = jax.nn.one_hot(labels, num_classes)
    return lam * one_hot + (1.0 - lam) * one_hot[::-1]


def dominant_labels(labels: jax.Array, lam: jax.Array) -> jax.Array:
    """Each mixed example's label of the larger weight (its own at lam = 1/2)."""
    return jnp.where(lam >= 0.5, labels, labels[::-1])


@dataclasses.dataclass(frozen=True)
class Mix:
    """`mix(images, rng) -> (images, lam)`: timm's mixup/CutMix in batch mode.

    With probability `prob` the batch is mixed with itself reversed, with one lam for the batch:
    CutMix with probability `switch_prob` when both alphas are > 0 (else the one that is), lam
    drawn from Beta(alpha, alpha) of the chosen one. lam is 1 when nothing is mixed. A frozen
    dataclass for the same reason as Preprocess.
    """

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5

    def __call__(self, images: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        apply_rng, switch_rng, lam_rng, box_rng = jax.random.split(rng, 4)
        if self.mixup_alpha and self.cutmix_alpha:
            use_cutmix = jax.random.bernoulli(switch_rng, float(self.switch_prob))
        else:
            use_cutmix = jnp.asarray(self.cutmix_alpha > 0)
        alpha = jnp.where(use_cutmix, self.cutmix_alpha, self.mixup_alpha)
        lam = jax.random.beta(lam_rng, alpha, alpha)
        mixed, lam = jax.lax.cond(
            use_cutmix,
            lambda: cutmix(box_rng, images, lam),
            lambda: (mixup(images, lam), lam),
        )
        applied = jax.random.bernoulli(apply_rng, float(self.prob))
        return jnp.where(applied, mixed, images), jnp.where(applied, lam, 1.0)


def make_mix(
    mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0, switch_prob: float = 0.5
) -> Mix | None:
    """The train step's mixup/CutMix (see Mix), or None when both alphas are 0 (off)."""
    if mixup_alpha < 0 or cutmix_alpha < 0 or not (0 <= prob <= 1 and 0 <= switch_prob <= 1):
        raise ValueError(
            f"alphas must be >= 0 and probabilities in [0, 1], got mixup_alpha={mixup_alpha}, "
            f"cutmix_alpha={cutmix_alpha}, prob={prob}, switch_prob={switch_prob}"
        )
    if not (mixup_alpha or cutmix_alpha):
        return None
    return Mix(float(mixup_alpha), float(cutmix_alpha), float(prob), float(switch_prob))
