"""The EMA of the weights and gradient accumulation in the train step: the average against its
formula, k micro-batches against one k-times larger batch, bf16, exact resume, config errors.

The multi-device cases (jit sharding and pmap against one device) are in test_parallel.py, and a
training run's reports (metrics.jsonl, results.json, evaluate) in test_train.py.
"""

import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import builders, checkpoint, config_utils, optim, parallel, train_state, workdir
from resnet_jax.errors import ConfigError

NUM_CLASSES = 10
INPUT_SHAPE = (1, 8, 8, 3)
SCHEDULE = optim.make_schedule("cosine", 0.1, 20, warmup_steps=2)
SGD_MOMENTUM = optim.make_optimizer("sgd", SCHEDULE, momentum=0.9, weight_decay=5e-4)


class SmallNet(nn.Module):
    """Conv, BatchNorm (or none), ReLU, mean pool, dense: compiles in a moment, unlike a ResNet.
    Without BatchNorm, its gradient on a batch is the mean of its examples' gradients."""

    norm: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), dtype=self.dtype)(x)
        if self.norm:
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
        x = jnp.mean(nn.relu(x), axis=(1, 2))
        return nn.Dense(NUM_CLASSES, dtype=self.dtype)(x).astype(jnp.float32)


def make_state(model=None, tx=SGD_MOMENTUM, ema=False):
    return train_state.create(model or SmallNet(), tx, jax.random.key(0), INPUT_SHAPE, ema=ema)


@functools.cache
def train_step(**settings):
    """The jitted step with these settings (and the schedule's rate reported), compiled once."""
    return jax.jit(train_state.TrainStep(learning_rate_fn=SCHEDULE, **settings))


def batches(count, size=16):
    rng = np.random.default_rng(0)
    return [
        {
            "image": jnp.asarray(rng.normal(size=(size, *INPUT_SHAPE[1:])), jnp.float32),
            "label": jnp.asarray(rng.integers(0, NUM_CLASSES, size), jnp.int32),
        }
        for _ in range(count)
    ]


# --- EMA -------------------------------------------------------------------------------------


@pytest.mark.parametrize("warmup", [False, True])
def test_the_ema_after_k_steps_is_its_formula(warmup):
    decay, steps = 0.9, 4
    state = make_state(ema=True)
    assert isinstance(state, train_state.EmaTrainState)
    weights = [state.variables]  # the trained weights after each update, from the start
    for batch in batches(steps):
        state, _ = train_step(ema_decay=decay, ema_warmup=warmup)(state, batch)
        weights.append(state.variables)

    # By hand, in float64: average_0 = the initial weights; after update t,
    # average_t = d_t * average_(t-1) + (1 - d_t) * weights_t.
    average = jax.tree.map(lambda x: np.asarray(x, np.float64), weights[0])
    for t in range(1, steps + 1):
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        average = jax.tree.map(
            lambda a, w, d=d: d * a + (1 - d) * np.asarray(w), average, weights[t]
        )
    chex.assert_trees_all_close(state.ema_variables, average, rtol=1e-5, atol=1e-6)
    assert state.ema_batch_stats and state.batch_stats  # BatchNorm statistics averaged too
    # Not just the latest weights, nor the first: the average lies between.
    latest = state.params["Dense_0"]["kernel"]
    first = weights[0]["params"]["Dense_0"]["kernel"]
    assert not np.allclose(state.ema_params["Dense_0"]["kernel"], latest, atol=1e-5)
    assert not np.allclose(state.ema_params["Dense_0"]["kernel"], first, atol=1e-5)
    # With warmup the first updates weigh more: the average is nearer the latest weights.
    assert (train_state.ema_decay_at(decay, warmup, 1) < decay) == warmup


def test_the_ema_does_not_change_training_and_evaluates_its_own_weights():
    plain, averaged = make_state(), make_state(ema=True)
    assert type(plain) is train_state.TrainState  # no EMA: the state (and checkpoint) as before
    for batch in batches(2):
        plain, _ = train_step()(plain, batch)
        averaged, _ = train_step(ema_decay=0.5)(averaged, batch)
    chex.assert_trees_all_close(averaged.variables, plain.variables, rtol=1e-6, atol=1e-7)
    batch = batches(1)[0]
    evaluate = jax.jit(train_state.EvalStep(averaged.apply_fn))
    by_ema = evaluate(averaged.ema_variables, batch)
    by_raw = evaluate(averaged.variables, batch)
    assert float(by_ema["loss"]) != float(by_raw["loss"])
    with pytest.raises(AssertionError, match="EMA state and decay"):
        train_state.TrainStep()(averaged, batch)  # an EMA state needs a step that moves it


# --- Gradient accumulation --------------------------------------------------------------------


def test_k_micro_batches_make_the_update_of_one_k_times_larger_batch(k=4):
    # Without BatchNorm: with it, each micro-batch is normalized by its own statistics (as in
    # torch's accumulation loops), so a BN net's update differs from the whole batch's.
    whole = accumulated = make_state(SmallNet(norm=False))
    for step, batch in enumerate(batches(3)):  # momentum carries the updates over
        whole, whole_metrics = train_step()(whole, batch)
        accumulated, metrics = train_step(grad_accumulation_steps=k)(accumulated, batch)
        assert int(accumulated.step) == step + 1  # one step is one optimizer update
        np.testing.assert_allclose(metrics["loss"], whole_metrics["loss"], rtol=1e-5)
        np.testing.assert_allclose(metrics["accuracy"], whole_metrics["accuracy"], rtol=1e-6)
        np.testing.assert_allclose(metrics["learning_rate"], SCHEDULE(step), rtol=1e-6)
    chex.assert_trees_all_close(accumulated.params, whole.params, rtol=1e-5, atol=1e-6)
    assert not np.allclose(
        accumulated.params["Dense_0"]["kernel"],
        make_state(SmallNet(norm=False)).params["Dense_0"]["kernel"],
    )
    # Not a step on one micro-batch only: that moves the params elsewhere.
    one_micro = make_state(SmallNet(norm=False))
    for batch in batches(3):
        one_micro, _ = train_step()(one_micro, jax.tree.map(lambda x: x[::k], batch))
    assert not np.allclose(
        one_micro.params["Dense_0"]["kernel"], whole.params["Dense_0"]["kernel"], atol=1e-4
    )


def test_accumulation_runs_each_micro_batch_through_batchnorm_in_turn():
    state = make_state()
    batch = batches(1)[0]
    new, _ = train_step(grad_accumulation_steps=2)(state, batch)
    # By hand: the BN statistics after micro-batch 0 (examples 0, 2, ...) then 1 (1, 3, ...).
    stats = state.batch_stats
    for index in range(2):
        _, updates = state.apply_fn(
            {"params": state.params, "batch_stats": stats}, batch["image"][index::2], train=True,
            mutable=["batch_stats"],
        )  # fmt: skip
        stats = updates["batch_stats"]
    chex.assert_trees_all_close(new.batch_stats, stats, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_bf16_with_ema_accumulation_and_large_batch_optimizers(name):
    tx = optim.make_optimizer(name, 0.5 if name == "lars" else 0.01, weight_decay=5e-4)
    state = make_state(SmallNet(dtype=jnp.bfloat16), tx, ema=True)
    step = train_step(grad_accumulation_steps=2, ema_decay=0.9, ema_warmup=True)
    batch = batches(1)[0]
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    for leaf in jax.tree.leaves((state.params, state.ema_params, state.ema_batch_stats)):
        assert leaf.dtype == jnp.float32
    assert metrics["loss"].dtype == jnp.float32 and np.all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses


# --- Resume -----------------------------------------------------------------------------------


def test_an_ema_and_accumulation_run_resumes_exactly(tmp_path):
    def new_state():
        return make_state(ema=True)

    step = train_step(grad_accumulation_steps=2, ema_decay=0.8, ema_warmup=True)
    first, second, third = batches(3)
    state, _ = step(new_state(), first)
    state, _ = step(state, second)
    checkpoints = checkpoint.Checkpoints(tmp_path / "checkpoints")
    checkpoints.save(state, {"epoch": 0})
    checkpoints.wait()
    target = parallel.Parallel("jit").restore_target(jax.eval_shape(new_state))
    restored = workdir.restore(checkpoints, 2, target)
    checkpoints.close()
    # Every array, ema_params and ema_batch_stats included, and so the steps that follow.
    chex.assert_trees_all_equal(jax.tree.leaves(restored), jax.tree.leaves(state))
    chex.assert_trees_all_equal(
        jax.tree.leaves(step(restored, third)), jax.tree.leaves(step(state, third))
    )


def test_a_checkpoint_without_ema_restores_only_without_one(tmp_path):
    checkpoints = checkpoint.Checkpoints(tmp_path / "checkpoints")
    state, _ = train_step()(make_state(), batches(1)[0])  # saved with a plain TrainState
    checkpoints.save(state, {"epoch": 0})
    checkpoints.wait()
    jit = parallel.Parallel("jit")
    restored = workdir.restore(checkpoints, 1, jit.restore_target(jax.eval_shape(make_state)))
    chex.assert_trees_all_equal(jax.tree.leaves(restored), jax.tree.leaves(state))
    with_ema = jax.eval_shape(lambda: make_state(ema=True))
    with pytest.raises(ConfigError, match=r"ema\.decay 0 or not"):
        workdir.restore(checkpoints, 1, jit.restore_target(with_ema))
    checkpoints.close()


# --- Config -----------------------------------------------------------------------------------


def test_ema_and_accumulation_keys_are_validated():
    config = config_utils.resolve({})
    assert config.ema.decay == 0.0 and config.optimizer.grad_accumulation_steps == 1  # off
    assert builders.reported_weights(config) == "raw"
    config = config_utils.resolve({"ema": {"decay": 0.999}, "batch_size": 96})
    assert builders.reported_weights(config) == "ema"
    config.ema.weights = "raw"
    assert builders.reported_weights(config) == "raw"
    for override, message in [
        ({"ema": {"decay": 1.0}}, r"ema\.decay = 1\.0 must be in \[0, 1\)"),
        ({"ema": {"weights": "best"}}, r"ema\.weights = 'best' is not one of: 'ema', 'raw'"),
        (
            {"optimizer": {"grad_accumulation_steps": 0}},
            r"grad_accumulation_steps = 0 must be >= 1",
        ),
    ]:
        with pytest.raises(ConfigError, match=message):
            config_utils.resolve(override)


def plan(devices: int, **config):
    """The run's plan for 1000 train examples on `devices` devices."""
    return builders.make_plan(config_utils.resolve(config), 1000, devices)


def test_the_batch_must_split_into_equal_micro_batches():
    accumulating = {"optimizer": {"grad_accumulation_steps": 3}}
    with pytest.raises(ConfigError) as info:
        plan(1, batch_size=128, **accumulating)

    assert re.search(r"grad_accumulation_steps = 3 does not divide batch_size = 128 .*e\.g\. 126 "
                     r"or 129", str(info.value))  # fmt: skip
    assert plan(1, batch_size=129, **accumulating).micro_batch_size == 43


def test_a_micro_batch_that_does_not_split_over_the_devices_is_explained():
    accumulating = {"optimizer": {"grad_accumulation_steps": 4}}
    assert plan(8, batch_size=128, **accumulating).micro_batch_size == 32  # 4 per device
    with pytest.raises(parallel.ParallelError) as info:
        plan(16, batch_size=96, eval_batch_size=64, **accumulating)  # micro-batches of 24
    message = str(info.value)
    assert "grad_accumulation_steps = 4" in message and "micro-batches of 24" in message
    assert "multiple of 64, for example 64 or 128 (--config.batch_size=64)" in message
