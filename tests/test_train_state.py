"""The train and eval steps on a tiny ResNet-20: learning, jit parity, the update and loss they
compute, mixing, bf16 compute, frozen backbones, and masked evaluation."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import augment, models, optim, train_state
from tests.conftest import REPO_ROOT

NUM_CLASSES = 10
INPUT_SHAPE = (1, 16, 16, 3)
MEMORIZE_STEPS = 50


@functools.cache
def jitted(step: train_state.TrainStep):
    """`step` compiled once per module (equal settings are equal steps); the jit cache also keys on
    the state's static fields (apply_fn, tx), so the states below share one optimizer where they
    can."""
    return jax.jit(step)


eval_step = jax.jit(train_state.eval_step)


def tiny_model(**kwargs):
    return models.get_model("resnet20", NUM_CLASSES, width=4, **kwargs)


@pytest.fixture(scope="module")
def variables():
    # Every variant below (frozen stages, bf16 compute) has this same variable tree. The "rbg" key
    # only keeps the compile of the initializers short; the steps' own rng stays the default one.
    init = jax.jit(lambda rng: tiny_model().init(rng, jnp.zeros(INPUT_SHAPE), train=False))
    return init(jax.random.key(0, impl="rbg"))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return {
        "image": jnp.asarray(rng.normal(size=(16, 16, 16, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, NUM_CLASSES, 16), jnp.int32),
    }


SCHEDULE = optim.make_schedule("cosine", 0.1, MEMORIZE_STEPS, warmup_steps=4)
SGD_MOMENTUM = optim.make_optimizer("sgd", SCHEDULE, momentum=0.9, weight_decay=5e-4)
PLAIN_SCHEDULE = optim.make_schedule("exponential", 0.5, 10, decay_rate=0.5)
PLAIN_SGD = optim.make_optimizer("sgd", PLAIN_SCHEDULE)


def make_state(variables, model=None, tx=SGD_MOMENTUM):
    return train_state.create(
        model or tiny_model(), tx, jax.random.key(1), INPUT_SHAPE, variables=variables
    )


# The step the states below train with: the schedule's rate reported, nothing else configured.
train_step = jitted(train_state.TrainStep(learning_rate_fn=SCHEDULE))


@pytest.fixture(scope="module")
def memorized(variables, batch):
    """The states and metrics of MEMORIZE_STEPS jitted steps on one fixed batch."""
    state = make_state(variables)
    states, history = [state], []
    for _ in range(MEMORIZE_STEPS):
        state, metrics = train_step(state, batch)
        states.append(state)
        history.append(jax.device_get(metrics))
    return states, history


def test_train_step_memorizes_a_fixed_batch(memorized):
    _, history = memorized
    losses = np.array([m["loss"] for m in history])
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.2 * losses[0], losses
    assert history[-1]["accuracy"] == 1.0


def test_learning_rate_metric_is_the_schedule_at_each_step(memorized):
    states, history = memorized
    for t, (state, metrics) in enumerate(zip(states, history, strict=False)):
        assert int(state.step) == t
        assert metrics["learning_rate"].dtype == np.float32
        np.testing.assert_allclose(metrics["learning_rate"], SCHEDULE(t), rtol=1e-5)
    assert history[0]["learning_rate"] == 0.0  # warmup starts from 0
    # ... and the optimizer used that rate: a zero rate leaves the params exactly as they were.
    chex.assert_trees_all_equal(states[1].params, states[0].params)
    assert not np.array_equal(states[2].params["fc"]["kernel"], states[1].params["fc"]["kernel"])


def test_jit_and_no_jit_steps_agree(memorized, batch):
    state = memorized[0][3]  # a few steps in: nonzero rate and momentum
    compiled = train_step(state, batch)
    eager = train_state.TrainStep(learning_rate_fn=SCHEDULE)(state, batch)
    chex.assert_trees_all_close(compiled, eager, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal_structs(compiled, eager)


def smoothed_cross_entropy(logits, labels, smoothing):
    """Mean of -sum_k q_k log softmax(logits)_k with q = (1 - a) one_hot + a / K."""
    targets = (1 - smoothing) * jax.nn.one_hot(labels, NUM_CLASSES) + smoothing / NUM_CLASSES
    return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1))


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_train_step_is_a_plain_sgd_step_on_the_smoothed_loss(variables, batch, smoothing):
    # Eager (no jit): its op kernels are shared with the other eager steps in this module.
    state = make_state(variables, tx=PLAIN_SGD)
    step = train_state.TrainStep(learning_rate_fn=PLAIN_SCHEDULE, label_smoothing=smoothing)
    for _ in range(2):  # step 2: a rate other than the first, and moved batch_stats
        state, _ = step(state, batch)

    def reference_loss(params):
        logits, updates = tiny_model().apply(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        return smoothed_cross_entropy(logits, batch["label"], smoothing), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(reference_loss, has_aux=True)(
        state.params
    )
    new_state, metrics = step(state, batch)

    # The loss as the formula says, checked in float64 from the logits.
    logits64 = np.asarray(logits, np.float64)
    log_probs = logits64 - np.log(np.sum(np.exp(logits64), -1, keepdims=True))
    labels = np.asarray(batch["label"])
    nll = -log_probs[np.arange(len(labels)), labels]
    uniform = -log_probs.mean(-1)
    expected_loss = np.mean((1 - smoothing) * nll + smoothing * uniform)
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-5)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    if smoothing:
        assert abs(float(metrics["loss"]) - np.mean(nll)) > 1e-3  # smoothing did change it

    rate = PLAIN_SCHEDULE(2)
    np.testing.assert_allclose(metrics["learning_rate"], rate, rtol=1e-6)
    expected_params = jax.tree.map(lambda p, g: p - rate * g, state.params, grads)
    chex.assert_trees_all_close(new_state.params, expected_params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(new_state.batch_stats, updates["batch_stats"], rtol=1e-6)
    assert int(new_state.step) == 3


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_one_hot_targets_give_the_loss_and_grads_of_class_indices(batch, smoothing):
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(16, NUM_CLASSES)), jnp.float32)
    labels = batch["label"]

    def loss(logits, targets):
        return train_state.cross_entropy(logits, targets, smoothing).mean()

    one_hot = jax.nn.one_hot(labels, NUM_CLASSES)
    chex.assert_trees_all_equal(
        jax.value_and_grad(loss)(logits, one_hot), jax.value_and_grad(loss)(logits, labels)
    )


def test_mixing_with_probability_zero_is_the_plain_step(variables, batch):
    plain = never_mixed = make_state(variables)
    mix = augment.Mix(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0)
    never_mixing = jitted(train_state.TrainStep(learning_rate_fn=SCHEDULE, mix=mix))
    for _ in range(2):
        plain, plain_metrics = train_step(plain, batch)
        never_mixed, metrics = never_mixing(never_mixed, batch)
        chex.assert_trees_all_equal(metrics, plain_metrics)
    chex.assert_trees_all_equal(never_mixed.params, plain.params)
    chex.assert_trees_all_equal(never_mixed.batch_stats, plain.batch_stats)


@dataclasses.dataclass(frozen=True)
class FixedMixup:
    """A Mix with a known lam: mixup at `lam` every step."""

    lam: float

    def __call__(self, images, rng):
        del rng
        lam = jnp.float32(self.lam)
        return augment.mixup(images, lam), lam


def test_train_step_learns_from_the_mixed_batch_and_scores_the_dominant_label(variables, batch):
    smoothing, lam = 0.1, 0.3
    step = train_state.TrainStep(label_smoothing=smoothing, mix=FixedMixup(lam))
    new_state, metrics = step(make_state(variables), batch)

    mixed = lam * batch["image"] + (1 - lam) * batch["image"][::-1]
    logits, updates = tiny_model().apply(variables, mixed, train=True, mutable=["batch_stats"])
    log_probs = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)))
    labels = np.asarray(batch["label"])
    smoothed = np.eye(NUM_CLASSES)[labels] * (1 - smoothing) + smoothing / NUM_CLASSES
    targets = lam * smoothed + (1 - lam) * smoothed[::-1]  # timm: smooth, then mix
    np.testing.assert_allclose(
        metrics["loss"], -np.mean(np.sum(targets * log_probs, -1)), rtol=1e-5
    )
    predictions = np.argmax(np.asarray(logits), -1)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(predictions == labels[::-1]))
    chex.assert_trees_all_close(new_state.batch_stats, updates["batch_stats"], rtol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_loss(variables, batch):
    state = make_state(variables, model=tiny_model(dtype=jnp.bfloat16))
    losses = []
    for _ in range(6):
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    chex.assert_trees_all_equal_dtypes(state.params, jax.tree.map(jnp.asarray, variables["params"]))
    for leaf in jax.tree.leaves((state.params, state.batch_stats, state.opt_state)):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    assert metrics["loss"].dtype == jnp.float32
    assert np.isfinite(metrics["loss"])
    assert losses[-1] < losses[0]  # it trains
    logits = state.apply_fn(state.variables, batch["image"], train=False)
    assert logits.dtype == jnp.float32


def test_frozen_backbone_keeps_params_and_batch_stats(variables, batch):
    # Stages 0 (stem) .. 3: the whole ResNet-20 backbone; only the fc head trains.
    model = tiny_model(frozen_stages=3)
    tx = optim.freeze(SGD_MOMENTUM, lambda path: models.stage_of(path) is not None)
    state = make_state(variables, model=model, tx=tx)
    start = state
    for _ in range(6):
        state, _ = train_step(state, batch)
    backbone = [k for k in start.params if k != "fc"]
    assert backbone and "fc" in start.params
    for name in backbone:
        chex.assert_trees_all_equal(state.params[name], start.params[name])
    chex.assert_trees_all_equal(state.batch_stats, start.batch_stats)
    assert not np.allclose(state.params["fc"]["kernel"], start.params["fc"]["kernel"])
    assert not np.allclose(state.params["fc"]["bias"], start.params["fc"]["bias"])


def test_partly_frozen_backbone_freezes_exactly_its_stages(variables, batch):
    # Stem and stage 1 frozen; stages 2 and 3 and the head train, and their BN statistics move.
    model = tiny_model(frozen_stages=1)
    frozen = lambda path: (stage := models.stage_of(path)) is not None and stage <= 1  # noqa: E731
    state = make_state(variables, model=model, tx=optim.freeze(SGD_MOMENTUM, frozen))
    start = state
    for _ in range(6):  # eager: a different freeze boundary would be one more compile
        state, _ = train_state.train_step(state, batch)
    for name in start.params:
        if frozen((name,)):
            chex.assert_trees_all_equal(state.params[name], start.params[name])
            chex.assert_trees_all_equal(
                state.batch_stats.get(name, {}), start.batch_stats.get(name, {})
            )
        else:
            for leaf, old in zip(
                jax.tree.leaves(state.params[name]),
                jax.tree.leaves(start.params[name]),
                strict=True,
            ):
                assert not np.array_equal(leaf, old), name
    for name in ("layer2_0", "layer3_2"):
        for leaf, old in zip(
            jax.tree.leaves(state.batch_stats[name]), jax.tree.leaves(start.batch_stats[name]),
            strict=True,
        ):  # fmt: skip
            assert not np.array_equal(leaf, old), name


def test_eval_step_ignores_padded_examples(memorized, batch):
    state = memorized[0][-1]
    rng = np.random.default_rng(5)
    real = 5
    # Padding that would change every figure if it counted: other images, other labels.
    images = np.concatenate(
        [np.asarray(batch["image"][:real]), rng.normal(size=(3, 16, 16, 3)).astype(np.float32)]
    )
    labels = np.concatenate([np.asarray(batch["label"][:real]), [0, 1, 2]]).astype(np.int32)
    mask = np.arange(8) < real
    padded = eval_step(state, {"image": images, "label": labels, "mask": mask})
    only_real = eval_step(state, {"image": images[:real], "label": labels[:real]})
    unmasked = eval_step(state, {"image": images, "label": labels, "mask": np.ones(8, bool)})

    assert float(padded["count"]) == real
    chex.assert_trees_all_equal(padded["correct"], only_real["correct"])
    chex.assert_trees_all_equal(padded["count"], only_real["count"])
    chex.assert_trees_all_equal(padded["confusion"], only_real["confusion"])
    chex.assert_shape(padded["confusion"], (NUM_CLASSES, NUM_CLASSES))
    for key in ("loss_sum", "loss", "accuracy"):
        np.testing.assert_allclose(padded[key], only_real[key], rtol=1e-6, err_msg=key)
    # The padding would have counted: it changes the count, the loss and the confusion.
    assert float(unmasked["count"]) == 8
    assert float(unmasked["loss_sum"]) > float(padded["loss_sum"])
    assert int(unmasked["confusion"].sum()) == 8

    # The sums agree with each other and with the per-batch figures.
    assert int(padded["confusion"].sum()) == real
    assert int(np.trace(padded["confusion"])) == float(padded["correct"])
    np.testing.assert_allclose(padded["loss"], padded["loss_sum"] / real, rtol=1e-6)
    np.testing.assert_allclose(padded["accuracy"], padded["correct"] / real, rtol=1e-6)
    # The labels of the real examples are the rows of the confusion matrix.
    np.testing.assert_array_equal(
        np.asarray(padded["confusion"]).sum(1), np.bincount(labels[:real], minlength=NUM_CLASSES)
    )

    nothing = eval_step(state, {"image": images, "label": labels, "mask": np.zeros(8, bool)})
    assert float(nothing["count"]) == 0 and float(nothing["loss"]) == 0.0
    assert int(nothing["confusion"].sum()) == 0


def test_the_eval_step_needs_only_the_variables(memorized, batch):
    state = memorized[0][-1]
    batch = {**batch, "mask": np.arange(16) < 11}

    on_variables = jax.jit(train_state.EvalStep(tiny_model().apply))(state.variables, batch)

    chex.assert_trees_all_close(on_variables, eval_step(state, batch), rtol=1e-6)


@pytest.mark.slow  # compiles four steps
def test_the_readme_python_api_runs():
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API") :]
    code = section[section.index("```python") + len("```python") : section.index("```\n\n")]
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 2).astype(np.int32)
    batch = {"image": rng.normal(size=(2, 32, 32, 3)).astype(np.float32), "label": labels}
    uint8_batch = {"image": rng.integers(0, 256, (2, 32, 32, 3), np.uint8), "label": labels}
    names = {"batch": batch, "uint8_batch": uint8_batch, "mask": np.array([True, False])}
    tiny = code.replace('"resnet50", num_classes=10, stem="cifar"', '"resnet20", 10, width=4')
    assert tiny != code
    exec(tiny, names)

    assert int(names["state"].step) == 2 and float(names["metrics"]["count"]) == 1
