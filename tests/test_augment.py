"""Tests for the on-device augmentation ops, the preprocess function built from them, and the
batch-level mixup/CutMix (RandAugment/TrivialAugment: test_autoaugment.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import augment, builders, config_utils
from resnet_jax.errors import ConfigError

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


def test_gray_images_go_through_every_augmentation_with_one_channel():
    images = _batch()[..., :1]
    preprocess = augment.make_preprocess(
        mean=(0.5,), std=(0.25,), crop_size=24, rotation=15.0, cutout_size=8,
        policy="trivialaugment", resize_to=40,
    )  # fmt: skip
    chex.assert_shape(jax.jit(preprocess)(images, jax.random.key(0)), (8, 40, 40, 1))
    evaluated = jax.jit(preprocess)(images, None)
    chex.assert_trees_all_close(
        evaluated, jax.image.resize((images / 255 - 0.5) / 0.25, (8, 40, 40, 1), "bilinear"),
        atol=1e-4,
    )  # fmt: skip
    # RGB statistics would broadcast a gray image to three channels: refused instead.
    with pytest.raises(ValueError, match="one value per channel of the 1-channel images"):
        augment.normalize(images, augment.CIFAR10_MEAN, augment.CIFAR10_STD)


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


def _mix_batch(count: int = 6) -> jax.Array:
    """Normalized-looking float images, every example distinct."""
    return jnp.asarray(np.random.default_rng(2).normal(size=(count, SIZE, SIZE, 3)), jnp.float32)


def test_mixup_is_the_convex_combination_with_the_reversed_batch():
    images = _mix_batch()
    lam = jnp.float32(0.3)
    expected = 0.3 * np.asarray(images) + 0.7 * np.asarray(images)[::-1]
    np.testing.assert_allclose(augment.mixup(images, lam), expected, rtol=1e-6, atol=1e-6)


def test_cutmix_pastes_one_box_and_lam_is_the_uncovered_fraction():
    images = _mix_batch()
    for key, lam in zip(_keys(16), np.linspace(0.05, 0.95, 16), strict=True):
        mixed, corrected = augment.cutmix(key, images, jnp.float32(lam))
        pasted = np.all(np.asarray(mixed) == np.asarray(images)[::-1], axis=(0, 3))
        kept = np.all(np.asarray(mixed) == np.asarray(images), axis=(0, 3))
        assert np.all(pasted != kept)  # every pixel is one or the other, in every image
        rows, cols = np.flatnonzero(pasted.any(1)), np.flatnonzero(pasted.any(0))
        if len(rows):
            assert pasted[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
        np.testing.assert_allclose(corrected, 1 - pasted.mean(), rtol=1e-6)
        # timm's box: sides int(size * sqrt(1 - lam)) rounded down to even, before clipping.
        assert pasted.sum() <= (int(SIZE * np.sqrt(1 - lam)) // 2 * 2) ** 2


def test_mixed_targets_sum_to_one_and_compose_with_smoothing_as_timm():
    labels = jnp.array([0, 3, 5, 3, 9])
    lam = jnp.float32(0.35)
    targets = augment.mix_targets(labels, lam, 10)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    assert targets[0, 0] == np.float32(0.35) and targets[0, 9] == np.float32(0.65)
    assert targets[1, 3] == 1.0 and targets[2, 5] == 1.0  # paired with the same class, itself
    # timm's mixup_target: smooth each one-hot (off = s / K, on = 1 - s + off), then mix.
    smoothing, off = 0.1, 0.1 / 10
    one_hot = np.eye(10)[np.asarray(labels)] * (1 - smoothing) + off
    timm = 0.35 * one_hot + 0.65 * one_hot[::-1]
    smoothed = optax.smooth_labels(targets, smoothing)
    np.testing.assert_allclose(smoothed, timm, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(augment.dominant_labels(labels, lam), np.asarray(labels)[::-1])
    np.testing.assert_array_equal(augment.dominant_labels(labels, jnp.float32(0.5)), labels)


def test_mix_with_probability_zero_changes_nothing():
    images = _mix_batch()
    mix = jax.jit(augment.make_mix(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.0))
    for key in _keys(4):
        mixed, lam = mix(images, key)
        chex.assert_trees_all_equal(mixed, images)
        assert lam == 1.0


@pytest.mark.parametrize(
    ("switch_prob", "cutmix_expected"), [(1.0, True), (0.0, False), (0.5, None)]
)
def test_mix_switches_between_cutmix_and_mixup(switch_prob, cutmix_expected):
    images = _mix_batch()
    mix = jax.jit(augment.make_mix(0.4, 1.0, prob=1.0, switch_prob=switch_prob))
    kinds = set()
    for key in _keys(12):
        mixed, lam = mix(images, key)
        assert 0.0 <= lam <= 1.0
        unchanged_or_pasted = (mixed == images) | (mixed == images[::-1])
        if bool(jnp.all(unchanged_or_pasted)):
            kinds.add("cutmix")
            np.testing.assert_allclose(lam, jnp.mean(jnp.all(mixed == images, axis=(0, 3))))
        else:
            kinds.add("mixup")
            np.testing.assert_allclose(mixed, augment.mixup(images, lam), rtol=1e-5, atol=1e-5)
    if cutmix_expected is None:
        assert kinds == {"cutmix", "mixup"}
    else:
        assert kinds == {"cutmix" if cutmix_expected else "mixup"}


def test_make_mix_is_off_without_alphas_and_checks_its_settings():
    assert augment.make_mix(0.0, 0.0, 0.5, 0.5) is None
    assert augment.make_mix(0.2) == augment.Mix(mixup_alpha=0.2)
    for bad in ({"mixup_alpha": -0.1}, {"cutmix_alpha": 1.0, "prob": 1.5}, {"switch_prob": -1}):
        with pytest.raises(ValueError, match="alphas must be >= 0"):
            augment.make_mix(**{"mixup_alpha": 1.0, **bad})


def test_mix_and_policy_keys_that_have_no_effect_are_logged(caplog):
    config = config_utils.resolve(
        {"augment": {"policy": "trivialaugment", "randaugment_magnitude": 20, "mix_prob": 0.5}}
    )
    with caplog.at_level("WARNING"):
        builders.build_preprocess(config, (32, 32, 3), builders.named_normalization("cifar10"))
        assert builders.build_mix(config) is None
    assert (
        "Ignoring augment.randaugment_magnitude: augment.policy is 'trivialaugment'" in caplog.text
    )
    assert "Ignoring augment.mix_prob: mixing is off" in caplog.text


def test_mix_and_policy_keys_are_validated_and_built():
    good = config_utils.resolve(
        {"augment": {"policy": "trivialaugment", "mixup_alpha": 0.2, "cutmix_alpha": 1.0}}
    )
    preprocess, shape = builders.build_preprocess(
        good, (32, 32, 3), builders.named_normalization("cifar10")
    )
    assert preprocess.policy == "trivialaugment" and shape == (1, 32, 32, 3)
    assert builders.build_mix(good) == augment.Mix(0.2, 1.0, 1.0, 0.5)
    # The run's train step is built with both.
    schedule = builders.build_schedule(good, builders.make_plan(good, 1000))
    step = builders.build_train_step(good, preprocess, schedule, axis_name=None)
    assert step.mix == augment.Mix(0.2, 1.0, 1.0, 0.5) and step.preprocess == preprocess
    assert builders.build_mix(config_utils.resolve({})) is None  # off by default
    cifar10 = builders.named_normalization("cifar10")
    default, _ = builders.build_preprocess(config_utils.resolve({}), (32, 32, 3), cifar10)
    assert default.policy == "none"
    bad = {
        "policy": "autoaugment",
        "mixup_alpha": -0.2,
        "cutmix_alpha": -1.0,
        "mix_prob": 1.5,
        "mix_switch_prob": -0.1,
        "randaugment_magnitude": 31,
    }
    with pytest.raises(ConfigError, match="The config has 6 problems") as info:
        config_utils.resolve({"augment": bad})
    message = str(info.value)
    for fragment in (
        "augment.policy = 'autoaugment' is not one of: 'none', 'randaugment', 'trivialaugment'",
        "augment.mixup_alpha = -0.2 must be >= 0",
        "augment.cutmix_alpha = -1.0 must be >= 0",
        "augment.mix_prob = 1.5 must be in [0, 1]",
        "augment.mix_switch_prob = -0.1 must be in [0, 1]",
        "augment.randaugment_magnitude = 31 must be in [0, 30]",
    ):
        assert fragment in message
