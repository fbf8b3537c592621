"""Stochastic depth (model.drop_path_rate): what a block computes with it, the rates over the
blocks, and that evaluation and the variables do not change."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import layers, models, train_state

TINY = {"width": 4}
KERNELS = ["xla", "cpu"]
CONV = functools.partial(nn.Conv, use_bias=False)
TRAIN_NORM = functools.partial(layers.BatchNorm, use_running_average=False)


def tiny_images(batch: int = 4) -> jax.Array:
    return jax.random.normal(jax.random.key(1), (batch, 16, 16, 3))


@functools.cache
def tiny_variables(name: str) -> dict:
    model = models.get_model(name, 10, kernels="xla", **TINY)
    return jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), tiny_images())


@pytest.mark.parametrize("name", ["resnet18", "resnet20", "resnet50"])
def test_the_rate_adds_no_variables(name):
    shapes = {
        rate: models.init_shapes(models.get_model(name, 10, drop_path_rate=rate), (1, 32, 32, 3))
        for rate in (0.0, 0.3)
    }

    chex.assert_trees_all_equal_shapes_and_dtypes(shapes[0.0], shapes[0.3])


@pytest.mark.parametrize("kernels", KERNELS)
def test_evaluation_is_unchanged_by_the_rate(kernels):
    variables = tiny_variables("resnet20")
    without = models.get_model("resnet20", 10, kernels=kernels, **TINY)
    with_rate = models.get_model("resnet20", 10, drop_path_rate=0.5, kernels=kernels, **TINY)

    expected = without.apply(variables, tiny_images(), train=False)
    # No "dropout" rng is passed: evaluation must not need one.
    logits = with_rate.apply(variables, tiny_images(), train=False)

    np.testing.assert_array_equal(logits, expected)


@pytest.mark.parametrize(("block_cls", "last_norm"), [(models.BasicBlock, "bn2"),
                                                      (models.Bottleneck, "bn3")])  # fmt: skip
def test_a_block_drops_or_scales_its_whole_residual_branch_per_example(block_cls, last_norm):
    rate, batch = 0.5, 32
    block = block_cls(filters=2, conv=CONV, norm=TRAIN_NORM, drop_path_rate=rate)
    x = jax.random.normal(jax.random.key(2), (batch, 4, 4, 2 * block_cls.expansion))
    variables = block.init(jax.random.key(0), x)

    out, state = block.apply(
        variables, x, deterministic=False, rngs={"dropout": jax.random.key(3)},
        mutable=["batch_stats", "intermediates"], capture_intermediates=True,
    )  # fmt: skip

    branch = state["intermediates"][last_norm]["__call__"][0]  # before the drop
    kept = np.isclose(out, nn.relu(branch / (1 - rate) + x), rtol=1e-5, atol=1e-6)
    dropped = np.isclose(out, nn.relu(x), rtol=1e-5, atol=1e-6)
    kept, dropped = kept.reshape(batch, -1).all(1), dropped.reshape(batch, -1).all(1)
    assert np.all(kept ^ dropped)  # each example: the whole branch, scaled, or none of it
    assert 0 < dropped.sum() < batch  # both happened (about half each)


def test_a_block_without_a_rate_or_at_evaluation_keeps_its_branch_as_is():
    x = jax.random.normal(jax.random.key(2), (8, 4, 4, 2))
    plain = models.BasicBlock(filters=2, conv=CONV, norm=TRAIN_NORM)
    dropping = plain.clone(drop_path_rate=0.5)
    variables = plain.init(jax.random.key(0), x)

    expected, _ = plain.apply(variables, x, deterministic=False, mutable=["batch_stats"])
    at_eval, _ = dropping.apply(variables, x, deterministic=True, mutable=["batch_stats"])

    np.testing.assert_array_equal(at_eval, expected)


@pytest.mark.parametrize(("name", "num_blocks"), [("resnet18", 8), ("resnet20", 9)])
def test_rates_rise_linearly_from_0_at_the_first_block_to_the_rate_at_the_last(name, num_blocks):
    model = models.get_model(name, 10, drop_path_rate=0.2, kernels="xla", **TINY)
    seen = []

    def record_rates(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(
            context.module, models.BasicBlock | models.Bottleneck
        ):
            seen.append((context.module.name, context.module.drop_path_rate))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record_rates):
        jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                       jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))  # fmt: skip

    expected = [0.2 * i / (num_blocks - 1) for i in range(num_blocks)]
    assert [rate for _, rate in seen] == pytest.approx(expected)
    assert seen[0][0] == "layer1_0" and seen[-1][0].startswith(f"layer{models.num_stages(model)}")


def test_frozen_stages_never_drop():
    variables = tiny_variables("resnet20")
    model = models.get_model("resnet20", 10, frozen_stages=3, drop_path_rate=0.9, **TINY)
    frozen = models.get_model("resnet20", 10, frozen_stages=3, **TINY)

    logits, _ = model.apply(
        variables, tiny_images(), train=True, mutable=["batch_stats"],
        rngs={"dropout": jax.random.key(5)},
    )  # fmt: skip
    expected, _ = frozen.apply(variables, tiny_images(), train=True, mutable=["batch_stats"])

    np.testing.assert_array_equal(logits, expected)


@pytest.mark.parametrize("kernels", KERNELS)
def test_the_train_step_draws_a_new_drop_per_step(kernels):
    model = models.get_model("resnet20", 10, drop_path_rate=0.5, kernels=kernels, **TINY)
    variables = tiny_variables("resnet20")
    state = train_state.create(
        model, optax.sgd(0.1), jax.random.key(0), (4, 16, 16, 3), variables=variables
    )
    batch = {"image": tiny_images(), "label": jnp.arange(4)}
    step = jax.jit(train_state.train_step)

    losses = [float(step(state.replace(step=jnp.asarray(s)), batch)[1]["loss"]) for s in (0, 0, 1)]

    assert np.isfinite(losses).all()
    assert losses[0] == losses[1]  # the drop is a function of the state's rng and step
    assert losses[0] != losses[2]  # and another at the next step (no augmentation here)
