"""Tests for random erasing (augment.random_erasing, timm's RandomErasing with one box), through
make_preprocess and the augment.random_erasing* config keys."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import augment, builders, config_utils
from resnet_jax.errors import ConfigError

TIMM = {"min_area": 0.02, "max_area": 1 / 3, "min_aspect": 0.3}  # timm's defaults
ZHONG = {"min_area": 0.02, "max_area": 0.4, "min_aspect": 0.3}  # Zhong et al.'s Fashion-MNIST


def _image(shape: tuple[int, ...]) -> np.ndarray:
    """Values in [10, 11): never 0, and never drawn by a normal(0, 1) fill in practice."""
    return np.random.default_rng(0).uniform(10, 11, size=shape).astype(np.float32)


def _erase_many(image: np.ndarray, count: int, seed: int = 0, **settings) -> np.ndarray:
    """`count` independent erasings of one HWC image, (count, H, W, C)."""
    erase = jax.jit(jax.vmap(lambda rng: augment.random_erasing(rng, image, **settings)))
    return np.asarray(erase(jax.random.split(jax.random.key(seed), count)))


def _boxes(erased: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The heights and widths of the erased (N, H, W) masks, asserting that each is one filled
    rectangle or empty (0 x 0)."""
    rows, cols = erased.any(axis=2), erased.any(axis=1)
    heights, widths = rows.sum(axis=1), cols.sum(axis=1)
    np.testing.assert_array_equal(erased, rows[:, :, None] & cols[:, None, :])
    for side in (*rows, *cols):  # each a run of consecutive rows (columns)
        indices = np.flatnonzero(side)
        assert len(indices) == 0 or indices[-1] - indices[0] + 1 == len(indices)
    return heights, widths


@pytest.mark.parametrize(
    ("shape", "settings"),
    [((32, 32, 3), TIMM), ((28, 28, 1), ZHONG), ((20, 40, 2), {**ZHONG, "min_aspect": 0.5})],
)
def test_one_box_inside_the_image_within_the_area_and_aspect_bounds(shape, settings):
    height, width, _ = shape
    image = _image(shape)
    out = _erase_many(image, 2000, probability=1.0, **settings)
    erased = out == 0  # "const" fills 0, which the image never holds
    np.testing.assert_array_equal(out[~erased], np.broadcast_to(image, out.shape)[~erased])
    np.testing.assert_array_equal(erased.all(axis=3), erased.any(axis=3))  # every channel
    box_heights, box_widths = _boxes(erased[..., 0])
    assert np.mean(box_heights > 0) > 0.99  # a box fits at nearly every try
    h, w = box_heights[box_heights > 0], box_widths[box_heights > 0]
    assert (w > 0).all() and (h < height).all() and (w < width).all()
    # The sides are the drawn sqrt(area * aspect) and sqrt(area / aspect) rounded, so some
    # unrounded sides within 1/2 of them must give an area and an aspect within the bounds.
    area = height * width
    assert ((h + 0.5) * (w + 0.5) >= settings["min_area"] * area).all()
    assert ((h - 0.5) * (w - 0.5) <= settings["max_area"] * area).all()
    assert ((h + 0.5) / (w - 0.5) >= settings["min_aspect"]).all()
    assert ((h - 0.5) / (w + 0.5) <= 1 / settings["min_aspect"]).all()
    # ... and the draws reach across them: small and large, wide and tall boxes.
    fractions, aspects = h * w / area, h / w
    assert fractions.min() < 1.5 * settings["min_area"]
    assert fractions.max() > 0.9 * settings["max_area"]
    assert aspects.min() < 1.2 * settings["min_aspect"]
    assert aspects.max() > 1 / (1.2 * settings["min_aspect"])


@pytest.mark.parametrize("probability", [0.0, 0.25, 0.5])
def test_erases_each_image_with_the_probability(probability):
    count = 4000
    out = _erase_many(_image((32, 32, 3)), count, probability=probability)
    erased_fraction = np.mean((out == 0).any(axis=(1, 2, 3)))
    # Binomial: 4.5 standard deviations (a box fits at the first of 10 tries nearly always).
    tolerance = 4.5 * np.sqrt(probability * (1 - probability) / count)
    assert abs(erased_fraction - probability) <= tolerance


def test_erases_nothing_when_no_box_fits_as_torchvision():
    # A box of 99% of the area is at least as tall or as wide as the image: no try fits.
    image = _image((32, 32, 3))
    out = _erase_many(image, 200, probability=1.0, min_area=0.99, max_area=0.99)
    np.testing.assert_array_equal(out, np.broadcast_to(image, out.shape))
    torch = pytest.importorskip("torch")
    transforms = pytest.importorskip("torchvision.transforms")
    reference = transforms.RandomErasing(p=1.0, scale=(0.99, 0.99), value=0)
    chw = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    assert all(torch.equal(reference(chw), chw) for _ in range(20))


def test_fill_modes():
    image = _image((32, 32, 3))
    count = 1000
    const = _erase_many(image, count, probability=1.0, mode="const")
    erased = const != image
    assert erased.any() and (const[erased] == 0).all()

    rand = _erase_many(image, count, probability=1.0, mode="rand")
    colors = []
    for example in rand:
        box = example[(example != image).all(axis=2)]  # (pixels, channels)
        if len(box):
            np.testing.assert_array_equal(box, np.broadcast_to(box[0], box.shape))  # one colour
            colors.append(box[0])
    colors = np.array(colors)
    assert len(colors) > 0.99 * count and (colors[:, 0] != colors[:, 1]).all()
    # One normal(0, 1) value per image and channel: mean and std within 5 standard errors.
    assert abs(colors.mean()) < 5 / np.sqrt(colors.size)
    assert abs(colors.std() - 1) < 5 / np.sqrt(2 * colors.size)

    pixel = _erase_many(image, count, probability=1.0, mode="pixel")
    for example in pixel:
        box = example[(example != image).all(axis=2)]
        if len(box):  # a value per pixel and channel (a box has >= 0.02 * 1024 pixels)
            assert (box.std(axis=0) > 0.2).all()
    noise = pixel[pixel != image]
    assert noise.size > 50_000
    assert abs(noise.mean()) < 5 / np.sqrt(noise.size)
    assert abs(noise.std() - 1) < 5 / np.sqrt(2 * noise.size)
    assert abs(np.mean(np.abs(noise) < 1) - 0.6827) < 0.01  # normal, not uniform


def _ks_distance(first: np.ndarray, second: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the samples' CDFs."""
    points = np.union1d(first, second)
    cdfs = [np.searchsorted(np.sort(s), points, side="right") / len(s) for s in (first, second)]
    return float(np.abs(cdfs[0] - cdfs[1]).max())


@pytest.mark.parametrize(("shape", "settings"), [((28, 28), ZHONG), ((20, 40), TIMM)])
def test_box_statistics_match_torchvision(shape, settings):
    torch = pytest.importorskip("torch")
    transforms = pytest.importorskip("torchvision.transforms")
    height, width = shape
    count = 10_000
    min_area, max_area, min_aspect = (
        settings["min_area"],
        settings["max_area"],
        settings["min_aspect"],
    )
    torch.manual_seed(0)
    reference = transforms.RandomErasing(
        p=1.0, scale=(min_area, max_area), ratio=(min_aspect, 1 / min_aspect), value=0
    )
    ones = torch.ones(1, height, width)
    theirs = np.stack([reference(ones)[0].numpy() for _ in range(count)]) == 0
    ours = _erase_many(np.ones((*shape, 1), np.float32), count, probability=1.0, **settings)
    samples = []
    for erased in (theirs, ours[..., 0] == 0):
        heights, widths = _boxes(erased)
        h, w = heights[heights > 0], widths[heights > 0]
        samples.append((h * w / (height * width), np.log(h / w), np.mean(heights > 0)))
    # Measured over 36 pairs of seeds: at most 0.025 for both. Uniform aspects (Zhong et al.'s
    # code) give 0.25, floored sides 0.05, boxes clipped to the image rather than drawn again
    # 0.06 (area) and 0.085 (aspect) at 20x40.
    assert _ks_distance(samples[0][0], samples[1][0]) < 0.035  # area fraction
    assert _ks_distance(samples[0][1], samples[1][1]) < 0.035  # log aspect
    assert abs(samples[0][2] - samples[1][2]) < 0.005  # images with no box that fits


SIZE = 32
CIFAR10 = builders.named_normalization("cifar10")
MEAN, STD = augment.CIFAR10_MEAN, augment.CIFAR10_STD


def _batch(count: int, channels: int = 3, size: int = SIZE) -> jax.Array:
    rng = np.random.default_rng(1)
    return jnp.asarray(rng.integers(0, 256, size=(count, size, size, channels), dtype=np.uint8))


def test_off_draws_the_other_augmentations_as_before():
    # Today's pipeline from its public ops and key derivation: erasing off must not change it,
    # whatever its other settings.
    def reference(images, rng):
        def augment_one(key, image):
            crop_rng, flip_rng, _, cutout_rng = jax.random.split(key, 4)
            image = augment.random_crop(crop_rng, image, 4, SIZE)
            return augment.cutout(cutout_rng, augment.random_flip(flip_rng, image), 8)

        keys = jax.random.split(rng, images.shape[0])
        return augment.normalize(jax.vmap(augment_one)(keys, images.astype(jnp.float32)), MEAN, STD)

    settings = {"mean": MEAN, "std": STD, "cutout_size": 8}
    off = augment.make_preprocess(
        **settings, erasing_prob=0.0, erasing_max_area=0.4, erasing_mode="pixel"
    )
    on = augment.make_preprocess(**settings, erasing_prob=1.0)
    images, rng = _batch(16), jax.random.key(5)
    expected = jax.jit(reference)(images, rng)
    chex.assert_trees_all_close(jax.jit(off)(images, rng), expected, atol=1e-6)
    assert not np.allclose(jax.jit(on)(images, rng), expected)


def test_grayscale_28x28_batch_through_make_preprocess():
    preprocess = augment.make_preprocess(
        mean=(0.2860,), std=(0.3530,), erasing_prob=0.5, erasing_max_area=0.4
    )
    images = _batch(256, channels=1, size=28)
    out = np.asarray(jax.jit(preprocess)(images, jax.random.key(0)))
    chex.assert_shape(out, (256, 28, 28, 1))
    chex.assert_type(out, np.float32)
    # Normalized uint8 values are never exactly 0 (the mean is 72.9 / 255), so zeros are boxes.
    box_heights, box_widths = _boxes(out[..., 0] == 0)
    erased = box_heights > 0
    assert abs(erased.mean() - 0.5) <= 4.5 * np.sqrt(0.25 / 256)
    assert (box_heights[erased] < 28).all() and (box_widths[erased] < 28).all()
    # Evaluation (no rng) erases nothing.
    expected = augment.normalize(images, (0.2860,), (0.3530,))
    chex.assert_trees_all_close(jax.jit(preprocess)(images, None), expected, atol=1e-6)


def test_make_preprocess_checks_the_erasing_settings():
    for bad in (
        {"erasing_prob": 1.5},
        {"erasing_min_area": 0.0},
        {"erasing_min_area": 0.5, "erasing_max_area": 0.3},
        {"erasing_min_aspect": 2.0},
    ):
        with pytest.raises(ValueError, match="erasing_prob must be in"):
            augment.make_preprocess(mean=MEAN, std=STD, **bad)
    with pytest.raises(ValueError, match="erasing_mode must be one of const, rand, pixel"):
        augment.make_preprocess(mean=MEAN, std=STD, erasing_mode="zero")


def test_erasing_keys_are_built_validated_and_logged_when_ignored(caplog):
    config = config_utils.resolve(
        {"augment": {"random_erasing": 0.5, "random_erasing_max_area": 0.4}}
    )
    preprocess, _ = builders.build_preprocess(config, (SIZE, SIZE, 3), CIFAR10)
    assert (preprocess.erasing_prob, preprocess.erasing_max_area) == (0.5, 0.4)
    assert (preprocess.erasing_min_area, preprocess.erasing_min_aspect) == (0.02, 0.3)
    assert preprocess.erasing_mode == "const"
    default, _ = builders.build_preprocess(config_utils.resolve({}), (SIZE, SIZE, 3), CIFAR10)
    assert default == augment.make_preprocess(mean=MEAN, std=STD)  # off by default

    ignored = config_utils.resolve({"augment": {"random_erasing_mode": "pixel"}})
    with caplog.at_level("WARNING"):
        builders.build_preprocess(ignored, (SIZE, SIZE, 3), CIFAR10)
    assert (
        "Ignoring augment.random_erasing_mode: random erasing is off (augment.random_erasing = 0)"
        in caplog.text
    )

    bad = {
        "random_erasing": 1.5,
        "random_erasing_min_area": 0.0,
        "random_erasing_min_aspect": 2.0,
        "random_erasing_mode": "zero",
    }
    with pytest.raises(ConfigError, match="The config has 4 problems") as info:
        config_utils.resolve({"augment": bad})
    message = str(info.value)
    assert "\n" not in message
    for fragment in (
        "augment.random_erasing = 1.5 must be in [0, 1] (0 = off)",
        "augment.random_erasing_min_area = 0.0 must be in (0, 1]",
        "augment.random_erasing_min_aspect = 2.0 must be in (0, 1]",
        "augment.random_erasing_mode = 'zero' is not one of: 'const', 'rand', 'pixel'",
    ):
        assert fragment in message
    with pytest.raises(ConfigError, match="The config has 1 problem: ") as info:
        config_utils.resolve(
            {"augment": {"random_erasing_min_area": 0.5, "random_erasing_max_area": 0.3}}
        )
    assert (
        "augment.random_erasing_min_area = 0.5 is larger than augment.random_erasing_max_area = "
        "0.3: the erased area is drawn between them, so set min_area <= max_area"
    ) in str(info.value)
