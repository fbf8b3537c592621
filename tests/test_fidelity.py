"""Faithful to the reports and to He et al. (2015): the deepest CIFAR net still trains."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import degradation
from resnet_jax import builders, config_utils, models, train_state, workdir
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
    preprocess, input_shape = builders.build_preprocess(config, (32, 32, 3))
    assert input_shape == (1, 24, 24, 3)
    images = jnp.zeros((2, 32, 32, 3), jnp.uint8)
    assert preprocess(images, jax.random.key(0)).shape == (2, 24, 24, 3)
    config.augment.crop_size = 40
    with pytest.raises(config_utils.ConfigError, match="centre crop"):
        builders.build_preprocess(config, (32, 32, 3))


class _Checkpoints:
    """The two questions chosen_checkpoint asks of a run's checkpoints."""

    def latest_step(self) -> int:
        return 64_000

    def best_step(self) -> int | None:
        return 48_000


def test_results_checkpoint_picks_the_final_or_the_best_validated():
    assert workdir.chosen_checkpoint(_Checkpoints(), "final")[0] == 64_000
    assert workdir.chosen_checkpoint(_Checkpoints(), "best_val")[0] == 48_000


@pytest.mark.parametrize("recipe", ["resnet20", "resnet56", "resnet110", "resnet1202"])
def test_he_et_al_recipes_train_on_all_50k_and_report_the_final_model(recipe):
    config = load_recipe(recipe)
    assert config.dataset.val_fraction == 0 and config.results_checkpoint == "final"
    assert config.num_steps == 64_000
    assert degradation.STUDY.base_config == "configs/resnet20.py"
    assert not degradation.STUDY.overrides  # the study inherits the protocol from the recipe
