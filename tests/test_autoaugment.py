"""RandAugment and TrivialAugmentWide on the device against torchvision's own definitions.

Each op runs on the same uint8 images through `torchvision.transforms.autoaugment._apply_op` (the
function torchvision's RandAugment and TrivialAugmentWide call, nearest interpolation, fill 0) and
through ours, at 32x32 and 20x28 (RGB) and at 32x32 gray (one channel, which torchvision's ops
take too). Tolerances, per op:
  - ShearX/Y, TranslateX/Y, Rotate: at most 1% of the values differ (an affine grid point within
    float error of a pixel boundary may round either way); measured on CPU: none differ.
  - Brightness, Color, Contrast, Sharpness: within 1 gray level. Measured on CPU: Brightness and
    Contrast exact; Color differs on at most 0.3% of the values, Sharpness on at most 8% (on the
    nearly constant image, where the blend lands on an integer and XLA's fused multiply-add
    rounds it the other way from torch's separate multiply and add before the truncation).
  - Identity, Posterize, Solarize, AutoContrast, Equalize: exact; on a gray image Color (the
    identity there) and Contrast (a blend with the image's own mean) too.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import augment, autoaugment

torch = pytest.importorskip("torch")
torchvision_autoaugment = pytest.importorskip("torchvision.transforms.autoaugment")
InterpolationMode = pytest.importorskip("torchvision.transforms").InterpolationMode

GEOMETRIC = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}
BLENDS = {"Brightness", "Color", "Contrast", "Sharpness"}
EXACT_ON_GRAY = {"Color", "Contrast"}  # no RGB -> gray conversion to round
UNSIGNED_MAGNITUDES = {
    "Identity": [0.0],
    "AutoContrast": [0.0],
    "Equalize": [0.0],
    "Posterize": [8.0, 6.0, 4.0, 2.0],
    "Solarize": [255.0, 200.5, 128.0, 0.0],
}


def _images(height: int, width: int, channels: int = 3) -> np.ndarray:
    """uint8 NHWC images: noise, smooth gradients, one of few values (in RGB with a constant
    channel: the degenerate cases of AutoContrast and Equalize), and one nearly constant."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (2, height, width, channels))
    smooth = np.cumsum(rng.integers(0, 20, (2, height, width, channels)), axis=2) % 256
    few = rng.choice([40, 90, 200], (1, height, width, channels))
    if channels == 3:
        few[..., 1] = 77
    nearly_constant = np.full((1, height, width, channels), 128)
    nearly_constant[0, 0, 0] = 129
    return np.concatenate([noise, smooth, few, nearly_constant]).astype(np.uint8)


def _magnitudes(name: str) -> list[float]:
    """A few signed magnitudes from TrivialAugmentWide's table (the widest ranges)."""
    if name in UNSIGNED_MAGNITUDES:
        return UNSIGNED_MAGNITUDES[name]
    row = autoaugment.magnitude_table("trivialaugment", 32, 32)[autoaugment.OPS.index(name)]
    return [float(sign * row[b]) for b in (4, 15, 30) for sign in (1, -1)]


def _torchvision(images: np.ndarray, name: str, magnitude: float) -> np.ndarray:
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    out = [
        torchvision_autoaugment._apply_op(
            image, name, magnitude, interpolation=InterpolationMode.NEAREST, fill=None
        )
        for image in nchw
    ]
    return torch.stack(out).permute(0, 2, 3, 1).numpy()


# One compile per image shape: the op and magnitude are traced arguments.
apply_op_batch = jax.jit(jax.vmap(autoaugment.apply_op, in_axes=(0, None, None)))


@pytest.mark.parametrize("shape", [(32, 32, 3), (20, 28, 3), (32, 32, 1)])
@pytest.mark.parametrize("name", autoaugment.OPS)
def test_each_op_matches_torchvision(name, shape):
    images = _images(*shape)
    gray = shape[-1] == 1
    for magnitude in _magnitudes(name):
        expected = _torchvision(images, name, magnitude).astype(np.float32)
        ours = np.asarray(
            apply_op_batch(images.astype(np.float32), autoaugment.OPS.index(name), magnitude)
        )
        assert ours.dtype == np.float32 and np.array_equal(ours, np.round(ours))
        differ = np.mean(ours != expected)
        message = f"{name} at {magnitude}: {differ:.2%} of the values differ"
        if name in GEOMETRIC:
            assert differ <= 0.01, message
        elif name in BLENDS and not (gray and name in EXACT_ON_GRAY):
            assert np.abs(ours - expected).max() <= 1, message
        else:
            np.testing.assert_array_equal(ours, expected, err_msg=message)


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_magnitude_tables_are_torchvisions(policy):
    height, width = 24, 40  # RandAugment's translations scale with each side
    if policy == "randaugment":
        space = torchvision_autoaugment.RandAugment()._augmentation_space(31, (height, width))
    else:
        space = torchvision_autoaugment.TrivialAugmentWide()._augmentation_space(31)
    assert list(space) == list(autoaugment.OPS)
    table = autoaugment.magnitude_table(policy, height, width)
    for row, (name, (magnitudes, signed)) in zip(table, space.items(), strict=True):
        expected = np.broadcast_to(magnitudes.numpy().astype(np.float32), row.shape)
        # Exact to the last bit: int() of a translation (15.999999 -> 15) depends on it.
        np.testing.assert_array_equal(row, expected, err_msg=name)
        assert signed == (name in autoaugment.SIGNED_OPS)


def test_randaugment_draws_n_ops_at_magnitude_m_with_random_signs():
    table = autoaugment.magnitude_table("randaugment", 32, 32)
    seen_ops, negated = set(), 0
    for key in jax.random.split(jax.random.key(0), 64):
        ops, magnitudes = autoaugment.sample_ops(key, "randaugment", 3, 7, 32, 32)
        chex.assert_shape((ops, magnitudes), (3,))
        for op, magnitude in zip(np.asarray(ops), np.asarray(magnitudes), strict=True):
            assert abs(magnitude) == table[op, 7]
            assert magnitude >= 0 or autoaugment.OPS[op] in autoaugment.SIGNED_OPS
            negated += magnitude < 0
        seen_ops.update(np.asarray(ops).tolist())
    assert seen_ops == set(range(len(autoaugment.OPS)))
    assert 30 < negated < 110  # about half of the signed ones (9/14 of 192 draws)


def test_trivialaugment_draws_one_op_at_a_uniform_magnitude():
    table = autoaugment.magnitude_table("trivialaugment", 32, 32)
    bins = set()
    for key in jax.random.split(jax.random.key(1), 64):
        ops, magnitudes = autoaugment.sample_ops(key, "trivialaugment", 2, 9, 32, 32)
        chex.assert_shape((ops, magnitudes), (1,))
        op, magnitude = int(ops[0]), abs(float(magnitudes[0]))
        bins.update(np.flatnonzero(table[op] == magnitude).tolist())
        assert magnitude in table[op]
    assert len(bins) > 15  # not one fixed magnitude


def test_a_policy_is_its_drawn_ops_in_turn():
    image = _images(16, 16)[0].astype(np.float32)
    for key in jax.random.split(jax.random.key(2), 4):
        ops, magnitudes = autoaugment.sample_ops(key, "randaugment", 2, 20, 16, 16)
        expected = image
        for op, magnitude in zip(ops, magnitudes, strict=True):
            expected = autoaugment.apply_op(expected, op, magnitude)
        augmented = autoaugment.apply_policy(key, image, "randaugment", 2, 20)
        chex.assert_trees_all_equal(augmented, expected)


def test_a_non_integral_image_is_rounded_to_uint8_values_first():
    image = _images(16, 16)[0].astype(np.float32)
    key = jax.random.key(3)
    shifted = autoaugment.apply_policy(key, image + 0.3, "trivialaugment")
    chex.assert_trees_all_equal(shifted, autoaugment.apply_policy(key, image, "trivialaugment"))


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_preprocess_gives_each_example_its_own_policy_draw(policy):
    image = _images(32, 32)[2]
    images = jnp.asarray(np.stack([image] * 8))
    preprocess = augment.make_preprocess(
        mean=(0.0,) * 3, std=(1 / 255,) * 3, crop_padding=0, flip=False, policy=policy
    )
    out = np.asarray(jax.jit(preprocess)(images, jax.random.key(0)))
    assert len({example.tobytes() for example in out}) > 4
    np.testing.assert_allclose(out, np.round(out), atol=1e-3)  # uint8 values, normalized by 1/255
    # Evaluation (no rng) runs no policy.
    evaluated = jax.jit(preprocess)(images, None)
    chex.assert_trees_all_close(evaluated, images.astype(jnp.float32), atol=1e-3)


def test_policy_settings_are_checked():
    with pytest.raises(ValueError, match="policy must be one of"):
        augment.make_preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, policy="autoaugment")
    with pytest.raises(ValueError, match="policy_magnitude"):
        augment.make_preprocess(
            mean=(0.5,) * 3, std=(0.5,) * 3, policy="randaugment", policy_magnitude=31
        )
