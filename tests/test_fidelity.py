"""Faithful to the reports and to He et al. (2015): the deepest CIFAR net still trains."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from experiments import degradation
from resnet_jax import builders, config_utils, convert, layers, models, train_state, workdir
from resnet_jax.errors import ConfigError
from tests.conftest import load_recipe


@pytest.mark.slow
def test_resnet1202_takes_a_training_step():
    # Op by op (no jit): compiling 1202 layers would take minutes here; this keeps the net honest.
    model = models.get_model("resnet1202", num_classes=10, width=2)
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    batch = {"image": jnp.asarray(images), "label": jnp.asarray([3, 7])}
    with jax.disable_jit():
        state = train_state.create(
            model, optax.sgd(0.1, momentum=0.9), jax.random.key(0), (1, 32, 32, 3)
        )
        new_state, metrics = train_state.train_step(state, batch)
    blocks = [name for name in state.params if name.startswith("layer")]
    assert len(blocks) == 3 * 200  # 6n+2 layers with n = 200
    assert np.isfinite(float(metrics["loss"]))
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, new_state.params)
    assert all(jax.tree.leaves(moved))  # every layer got a gradient through 600 blocks


def test_report_004s_crop_trains_and_evaluates_at_24x24():
    config = config_utils.resolve(
        {"augment": {"crop_size": 24, "resize_crop": False, "rotation": 180.0,
                     "rotation_from_zero": True, "rotation_interpolation": "nearest"}}
    )  # fmt: skip
    preprocess, input_shape = builders.build_preprocess(
        config, (32, 32, 3), builders.named_normalization("cifar10")
    )
    assert input_shape == (1, 24, 24, 3)
    images = jnp.zeros((2, 32, 32, 3), jnp.uint8)
    assert preprocess(images, jax.random.key(0)).shape == (2, 24, 24, 3)
    config.augment.crop_size = 40
    with pytest.raises(ConfigError, match="centre crop"):
        builders.build_preprocess(config, (32, 32, 3), builders.named_normalization("cifar10"))


class _Checkpoints:
    """The two questions reported_checkpoint asks of a run's checkpoints."""

    def latest_step(self) -> int:
        return 64_000

    def best_step(self) -> int | None:
        return 48_000


def test_results_checkpoint_picks_the_final_or_the_best_validated():
    assert workdir.reported_checkpoint(_Checkpoints(), "final")[0] == 64_000
    assert workdir.reported_checkpoint(_Checkpoints(), "best_val")[0] == 48_000


@pytest.mark.parametrize("recipe", ["resnet20", "resnet56", "resnet110", "resnet1202"])
def test_he_et_al_recipes_train_on_all_50k_and_report_the_final_model(recipe):
    config = load_recipe(recipe)
    assert config.dataset.val_fraction == 0 and config.results_checkpoint == "final"
    assert config.num_steps == 64_000
    assert degradation.STUDY.base_config == "configs/resnet20.py"
    assert not degradation.STUDY.overrides  # the study inherits the protocol from the recipe


@pytest.mark.parametrize("kernels", ["xla", "cpu"])
def test_a_training_forward_updates_batchnorm_statistics_as_torch_does(kernels):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    # A copy: the conversion may share memory with the tensors the forward updates in place.
    initial = {key: value.clone() for key, value in net.state_dict().items()}
    variables = convert.torchvision_to_flax(initial, arch="resnet18")
    images = torch.randn(4, 3, 32, 32)
    net.train()(images)  # running statistics after one batch, momentum 0.1
    model = models.get_model("resnet18", num_classes=1000, kernels=kernels)
    _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, jnp.asarray(images.permute(0, 2, 3, 1).numpy())
    )
    expected = convert.torchvision_to_flax(net.state_dict(), arch="resnet18")["batch_stats"]
    for path, ours in traverse_util.flatten_dict(updates["batch_stats"]).items():
        theirs = traverse_util.flatten_dict(expected)[path]
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6, err_msg=str(path))


def test_batchnorm_normalizes_as_flax_and_keeps_torchs_unbiased_running_variance():
    x = 2.0 * jax.random.normal(jax.random.key(0), (4, 3, 3, 8)) + 1.0
    ours, flax_bn = layers.BatchNorm(momentum=0.9), nn.BatchNorm(momentum=0.9)
    variables = flax_bn.init(jax.random.key(1), x, use_running_average=False)
    y, ours_stats = ours.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    flax_y, flax_stats = flax_bn.apply(
        variables, x, use_running_average=False, mutable=["batch_stats"]
    )
    np.testing.assert_allclose(y, flax_y, rtol=1e-5, atol=1e-5)
    count = 4 * 3 * 3
    batch_var = x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(
        ours_stats["batch_stats"]["var"], 0.9 + 0.1 * batch_var * count / (count - 1), rtol=1e-5
    )
    np.testing.assert_allclose(
        flax_stats["batch_stats"]["mean"], ours_stats["batch_stats"]["mean"], rtol=1e-6
    )


def test_the_head_starts_from_torchs_linear_init():
    model = models.get_model("resnet18", num_classes=1000, kernels="xla")
    params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))()["params"]
    bias, bound = np.asarray(params["fc"]["bias"]), 512**-0.5
    assert np.abs(bias).max() <= bound and np.abs(bias).max() > 0.9 * bound  # U(-b, b), not zeros
