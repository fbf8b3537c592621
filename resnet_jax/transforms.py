"""Host-side image transforms for the streaming pipeline, exact to torchvision's definitions.

They run in the input pipeline's worker processes on PIL images and return uint8 HWC arrays (a
gray image keeps a channel axis of 1): `decode_image` is torchvision's `default_loader` (in the
dataset's mode: RGB, or L for gray data), `random_resized_crop` is `RandomResizedCrop`
(the box drawn by `random_resized_crop_box` from a numpy Generator instead of torch's global RNG),
`resize_center_crop` is `Compose([Resize(256), CenterCrop(224)])` (`eval_crop` at any size).
tests/test_transforms.py checks each against torchvision pixel for pixel. The flip and the
normalization are not here: they run on the device, shared with memory mode.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from resnet_jax.errors import UserError

# The PIL mode that images of each channel count are read in (PNG's four: gray, gray + alpha, RGB,
# RGBA). An image folder is gray or RGB (data.folder_channels); a tfds dataset says its count.
MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
# What PIL raises for a file that is not a readable image. OSError: unknown format, truncated
# data, unreadable file; the others: corrupt headers.
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class BadImage(UserError):
    """A file that is not a readable image; the streaming pipeline skips it with a warning."""


def to_array(image: Image.Image) -> np.ndarray:
    """A PIL image as a uint8 HWC array; a gray one keeps a channel axis of 1."""
    pixels = np.asarray(image, np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def decode_image(data: bytes | Path, name: str = "", mode: str = "RGB") -> Image.Image:
    """Decodes encoded image bytes (or reads a file) into a PIL image of `mode` ("RGB", or "L"
    for gray data), like torchvision's loader.

    `convert` decodes every pixel, so a truncated file fails here, not later in a crop. Raises
    BadImage naming `name` (or the path) when the data is not a complete image.
    """
    name = name or (str(data) if isinstance(data, Path) else "<bytes>")
    try:
        image = Image.open(io.BytesIO(data.read_bytes() if isinstance(data, Path) else data))
        image.load()
        # What convert(mode) returns for an image in that mode, without its copy of the pixels.
        return image if image.mode == mode else image.convert(mode)
    except UNREADABLE as error:
        raise BadImage(f"Skipped {name}: it is not a readable image ({error}).") from error


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """The (top, left, h, w) crop box of torchvision's `RandomResizedCrop.get_params`.

    Up to 10 draws of an area fraction in `scale` and a log-uniform aspect ratio in `ratio`; the
    first box that fits is placed uniformly. Otherwise the centre crop of the whole image, clamped
    to the ratio bounds.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w

    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    image: Image.Image,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """torchvision's `RandomResizedCrop(size)` on a PIL image: a (size, size, C) uint8 array.

    The box crop and the bilinear PIL resize of `F.resized_crop` (PIL always antialiases).
    """
    top, left, h, w = random_resized_crop_box(image.height, image.width, rng, scale, ratio)
    crop = image.crop((left, top, left + w, top + h))
    return to_array(crop.resize((size, size), Image.Resampling.BILINEAR))


def resize_center_crop(image: Image.Image, resize: int = 256, crop: int = 224) -> np.ndarray:
    """torchvision's `Compose([Resize(resize), CenterCrop(crop)])` on a PIL image, as uint8.

    The shorter side goes to `resize` and the longer to int(resize * long / short); the crop's
    offsets round half to even, as torchvision's `round`, after zero padding to at least `crop`.
    """
    short, long = sorted((image.width, image.height))
    new_long = int(resize * long / short)
    new_size = (resize, new_long) if image.width <= image.height else (new_long, resize)
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BILINEAR)
    pixels = to_array(image)
    pad_h, pad_w = max(crop - pixels.shape[0], 0), max(crop - pixels.shape[1], 0)
    if pad_h or pad_w:  # CenterCrop's padding: the odd pixel goes to the bottom / right
        pixels = np.pad(
            pixels, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
        )
    top = round((pixels.shape[0] - crop) / 2.0)
    left = round((pixels.shape[1] - crop) / 2.0)
    return pixels[top : top + crop, left : left + crop]


# torchvision's reference evaluates Resize(256) + CenterCrop(224): the same ratio at any size.
EVAL_RESIZE_RATIO = 256 / 224


def eval_crop(image: Image.Image, size: int) -> np.ndarray:
    """The evaluation view of an image of any size at `size` x `size`: Resize(size * 256 / 224)
    + CenterCrop(size), torchvision's Resize(256) + CenterCrop(224) at 224."""
    return resize_center_crop(image, round(size * EVAL_RESIZE_RATIO), size)
