"""Tests for the on-device augmentation ops and the preprocess function built from them."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import augment

SIZE = 32


@pytest.fixture
def image() -> np.ndarray:
    """A float HWC image of distinct, non-zero values, so zero padding is recognizable."""
    rng = np.random.default_rng(0)
    return rng.integers(1, 256, size=(SIZE, SIZE, 3)).astype(np.float32)


def _keys(count: int) -> jax.Array:
    return jax.random.split(jax.random.key(0), count)


def test_flip_twice_is_identity(image):
    for key in _keys(4):
        twice = augment.random_flip(key, augment.random_flip(key, image))
        chex.assert_trees_all_equal(twice, image)


def test_flip_mirrors_or_keeps(image):
    flips = [augment.random_flip(key, image) for key in _keys(16)]
    mirrored = [bool(jnp.array_equal(f, image[:, ::-1])) for f in flips]
    kept = [bool(jnp.array_equal(f, image)) for f in flips]
    assert all(m != k for m, k in zip(mirrored, kept, strict=True))
    assert any(mirrored) and any(kept)


def test_crop_is_a_window_of_the_padded_image(image):
    padding = 4
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    offsets = set()
    for key in _keys(32):
        crop = np.asarray(augment.random_crop(key, image, padding, SIZE))
        chex.assert_shape(crop, (SIZE, SIZE, 3))
        matches = [
            (top, left)
            for top in range(2 * padding + 1)
            for left in range(2 * padding + 1)
            if np.array_equal(crop, padded[top : top + SIZE, left : left + SIZE])
        ]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 8  # the offsets vary


def test_crop_of_a_smaller_window(image):
    crop = augment.random_crop(jax.random.key(1), image, 0, (24, 20))
    chex.assert_shape(crop, (24, 20, 3))
    assert (np.asarray(crop) > 0).all()  # no padding, so never out of the image


def test_crop_without_padding_at_full_size_is_identity(image):
    chex.assert_trees_all_equal(augment.random_crop(jax.random.key(0), image, 0, SIZE), image)


def test_rotation_by_zero_is_identity(image):
    chex.assert_trees_all_equal(augment.rotate(image, 0.0), image)


def test_rotation_by_180_flips_both_axes(image):
    chex.assert_trees_all_close(augment.rotate(image, 180.0), image[::-1, ::-1], atol=1e-2)


def test_positive_rotation_is_counter_clockwise(image):
    chex.assert_trees_all_close(augment.rotate(image, 90.0), np.rot90(image), atol=1e-2)


def test_rotation_fills_corners_with_zeros(image):
    rotated = np.asarray(augment.rotate(image, 45.0))
    assert (rotated[0, 0] == 0).all() and (rotated[SIZE // 2, SIZE // 2] != 0).all()


def test_random_rotation_stays_in_range(image):
    # The angle is uniform(key) in [-max, max]; the image is rotate() by that angle.
    for key in _keys(4):
        rotated = augment.random_rotation(key, image, max_degrees=10.0)
        degrees = jax.random.uniform(key, minval=-10.0, maxval=10.0)
        assert -10.0 <= float(degrees) <= 10.0
        chex.assert_trees_all_close(rotated, augment.rotate(image, degrees))


def test_cutout_zeroes_one_square(image):
    size = 8
    for key in _keys(8):
        zeroed = np.asarray(augment.cutout(key, image, size)) == 0
        rows, cols = (
            np.flatnonzero(zeroed.any(axis=(1, 2))),
            np.flatnonzero(zeroed.any(axis=(0, 2))),
        )
        assert 0 < len(rows) <= size and 0 < len(cols) <= size
        assert zeroed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
        assert zeroed.sum() == len(rows) * len(cols) * 3


def test_normalize_matches_the_formula(image):
    mean, std = augment.CIFAR10_MEAN, augment.CIFAR10_STD
    expected = (image / 255.0 - np.array(mean)) / np.array(std)
    normalized = augment.normalize(image.astype(np.uint8), mean, std)
    assert normalized.dtype == jnp.float32
    chex.assert_trees_all_close(normalized, expected.astype(np.float32), rtol=1e-5, atol=1e-5)


def _batch(count: int = 8) -> jax.Array:
    """`count` copies of one uint8 image, so any difference between outputs is augmentation."""
    image = np.random.default_rng(1).integers(1, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    return jnp.asarray(np.stack([image] * count))


def test_preprocess_augments_each_example_differently():
    preprocess = jax.jit(
        augment.make_preprocess(mean=augment.CIFAR10_MEAN, std=augment.CIFAR10_STD)
    )
    images = _batch()
    out = preprocess(images, jax.random.key(0))
    chex.assert_shape(out, images.shape)
    chex.assert_type(out, jnp.float32)
    distinct = {np.asarray(example).tobytes() for example in out}
    assert len(distinct) > 4


def test_preprocess_is_deterministic_for_an_rng():
    preprocess = jax.jit(
        augment.make_preprocess(
            mean=augment.CIFAR10_MEAN, std=augment.CIFAR10_STD, rotation=15.0, cutout_size=8
        )
    )
    images = _batch()
    first = preprocess(images, jax.random.key(3))
    chex.assert_trees_all_equal(first, preprocess(images, jax.random.key(3)))
    assert not np.array_equal(first, preprocess(images, jax.random.key(4)))


def test_preprocess_without_rng_only_normalizes():
    preprocess = augment.make_preprocess(
        mean=augment.CIFAR10_MEAN, std=augment.CIFAR10_STD, rotation=15.0, cutout_size=8
    )
    images = _batch()
    expected = augment.normalize(images, augment.CIFAR10_MEAN, augment.CIFAR10_STD)
    chex.assert_trees_all_close(jax.jit(preprocess)(images, None), expected, atol=1e-6)


@pytest.mark.parametrize("train", [True, False])
def test_preprocess_output_shapes(train):
    rng = jax.random.key(0) if train else None
    images = _batch(4)
    small_crop = augment.make_preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, crop_size=24)
    chex.assert_shape(jax.jit(small_crop)(images, rng), (4, SIZE, SIZE, 3))
    resized = augment.make_preprocess(
        mean=augment.IMAGENET_MEAN, std=augment.IMAGENET_STD, crop_size=24, resize_to=64
    )
    out = jax.jit(resized)(images, rng)
    chex.assert_shape(out, (4, 64, 64, 3))
    chex.assert_type(out, jnp.float32)


def test_equal_settings_give_equal_preprocess():
    settings = {"mean": augment.CIFAR10_MEAN, "std": augment.CIFAR10_STD, "rotation": 5}
    first = augment.make_preprocess(**settings)
    second = augment.make_preprocess(**{**settings, "mean": list(augment.CIFAR10_MEAN)})
    assert first == second and hash(first) == hash(second)
    assert first != augment.make_preprocess(**{**settings, "flip": False})


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
@pytest.mark.parametrize("degrees", [30.0, 137.0])
def test_rotation_matches_torchvision(image, interpolation, degrees):
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("torchvision.transforms.functional")
    mode = getattr(functional.InterpolationMode, interpolation.upper())
    chw = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    expected = functional.rotate(chw, degrees, interpolation=mode).numpy().transpose(1, 2, 0)
    rotated = np.asarray(augment.rotate(image, degrees, interpolation))
    if interpolation == "bilinear":
        np.testing.assert_allclose(rotated, expected, atol=1e-2)
    else:
        # A source coordinate that lands within float error of a pixel boundary may round either
        # way; every other pixel is the same input pixel.
        assert np.mean(rotated != expected) < 0.01


def test_random_rotation_from_zero_draws_in_zero_to_max(image):
    for key in _keys(4):
        rotated = augment.random_rotation(key, image, 180.0, 0.0, "nearest")
        degrees = jax.random.uniform(key, minval=0.0, maxval=180.0)
        chex.assert_trees_all_equal(rotated, augment.rotate(image, degrees, "nearest"))


def test_center_crop_matches_torchvision(image):
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("torchvision.transforms.functional")
    chw = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    for size in (24, 25):
        expected = functional.center_crop(chw, [size, size]).numpy().transpose(1, 2, 0)
        chex.assert_trees_all_equal(augment.center_crop(image, size), expected)


def test_training_at_the_crop_size_evaluates_on_the_centre_crop():
    # Report 004's pipeline: RandomCrop(24, padding=4) of 32x32 images, trained at 24x24.
    preprocess = augment.make_preprocess(
        mean=(0.0,) * 3, std=(1 / 255,) * 3, crop_padding=4, crop_size=24, resize_crop=False,
        rotation=180.0, rotation_from_zero=True, rotation_interpolation="nearest",
    )  # fmt: skip
    images = _batch(4)
    chex.assert_shape(jax.jit(preprocess)(images, jax.random.key(0)), (4, 24, 24, 3))
    evaluated = jax.jit(preprocess)(images, None)
    chex.assert_trees_all_close(evaluated, images[:, 4:28, 4:28].astype(jnp.float32), atol=1e-3)
