"""Test-time augmentation (evaluate --tta flip): the logits are the mean of the image's and its
mirror's, and the evaluation step uses them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import evaluate, evaluation, models, train_state
from resnet_jax.errors import ConfigError


@pytest.fixture(scope="module")
def state():
    model = models.get_model("resnet20", 10, width=4)
    return train_state.create(model, optax.identity(), jax.random.key(0), (1, 16, 16, 3))


def images() -> jax.Array:
    return jax.random.normal(jax.random.key(1), (4, 16, 16, 3))


def test_flip_logits_are_the_mean_of_the_image_and_its_mirror(state):
    plain = state.apply_fn(state.variables, images(), train=False)
    mirrored = state.apply_fn(state.variables, jnp.flip(images(), axis=2), train=False)

    logits = evaluation.flip_averaged(state.apply_fn)(state.variables, images(), train=False)

    np.testing.assert_allclose(logits, (plain + mirrored) / 2, rtol=1e-6, atol=1e-6)
    assert np.abs(plain - mirrored).max() > 1e-4  # the mirror did change what the model saw


def test_the_eval_step_scores_the_averaged_logits(state):
    labels = jnp.array([0, 1, 2, 3])
    averaged = evaluation.flip_averaged(state.apply_fn)(state.variables, images(), train=False)
    eval_step = train_state.EvalStep(evaluation.TTA["flip"](state.apply_fn))

    metrics = jax.jit(eval_step)(state.variables, {"image": images(), "label": labels})

    expected = optax.softmax_cross_entropy_with_integer_labels(averaged, labels).mean()
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
    assert metrics["correct"] == np.sum(np.argmax(averaged, -1) == labels)


def test_tta_results_never_go_over_the_plain_results(tmp_path):
    default = evaluate.tta_output(str(tmp_path), None, None, "flip")
    from_checkpoint = evaluate.tta_output(None, str(tmp_path / "checkpoints" / "18"), None, "flip")

    assert default == from_checkpoint == tmp_path / "results_tta_flip.json"
    with pytest.raises(ConfigError, match=r"plain results\.json"):
        evaluate.tta_output(str(tmp_path), None, str(tmp_path / "results.json"), "flip")
