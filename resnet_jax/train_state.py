"""TrainState and the pure train/eval steps that every mode (plain, jit-sharded, pmap) compiles.

A step takes a batch of raw images (uint8 or float, NHWC) and does everything on the device:
augment with a per-step rng, normalize, mix (mixup/CutMix, optional), forward with mutable
batch_stats, float32 loss, grads, and the optax update. Under pmap (the model built with
`axis_name`) grads and metrics are averaged across devices with `lax.pmean` and BatchNorm uses
cross-device statistics; each device mixes its own shard, with its own lam.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state as flax_train_state

from resnet_jax import augment
from resnet_jax import metrics as metrics_lib

Batch = dict[str, jax.Array]
Preprocess = Callable[[jax.Array, jax.Array | None], jax.Array]
# (images, rng) -> (mixed images, lam): augment.Mix
Mix = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def cast_to_float(images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """The default preprocessing: images are already normalized floats; just cast."""
    del rng
    return images.astype(jnp.float32)


class TrainState(flax_train_state.TrainState):
    """Flax's TrainState plus BatchNorm statistics, the augmentation rng and static step options."""

    batch_stats: Any
    rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays
    preprocess: Preprocess = struct.field(pytree_node=False, default=cast_to_float)
    label_smoothing: float = struct.field(pytree_node=False, default=0.0)
    axis_name: str | None = struct.field(pytree_node=False, default=None)
    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = struct.field(
        pytree_node=False, default=None
    )
    mix: Mix | None = struct.field(pytree_node=False, default=None)

    @property
    def variables(self) -> dict[str, Any]:
        """What `model.apply` takes: {"params", "batch_stats"}."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def create(
    model: nn.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    input_shape: Sequence[int],
    *,
    variables: dict[str, Any] | None = None,
    preprocess: Preprocess = cast_to_float,
    label_smoothing: float = 0.0,
    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
    mix: Mix | None = None,
) -> TrainState:
    """Initialize the model (or take given `variables`, e.g. pretrained) and the optimizer state.

    `rng` seeds both the init and the per-step augmentation. `preprocess(images, rng)` runs inside
    the steps (rng=None at eval); `mix(images, rng)` (e.g. augment.Mix) after it in the train
    step. The pmap axis name is taken from `model.axis_name`.
    """
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    init_rng, step_rng = jax.random.split(rng)
    if variables is None:
        init = jax.jit(lambda r: model.init(r, jnp.zeros(input_shape, jnp.float32), train=False))
        variables = init(init_rng)
    params = variables["params"]
    return TrainState(
        step=jnp.asarray(0, jnp.int32),
        apply_fn=model.apply,
        params=params,
        tx=tx,
        opt_state=tx.init(params),
        batch_stats=variables.get("batch_stats", {}),
        rng=step_rng,
        preprocess=preprocess,
        label_smoothing=label_smoothing,
        axis_name=getattr(model, "axis_name", None),
        learning_rate_fn=learning_rate_fn,
        mix=mix,
    )


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy in float32, with optional label smoothing.

    `labels` are class indices, or target distributions over the classes (e.g. mixed one-hots).
    Smoothing is linear, so smoothing a mixture equals mixing the smoothed one-hots (timm's).
    """
    num_classes = logits.shape[-1]
    targets = labels if labels.ndim == logits.ndim else jax.nn.one_hot(labels, num_classes)
    targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _step_rng(state: TrainState) -> jax.Array:
    rng = jax.random.fold_in(state.rng, state.step)
    if state.axis_name is not None:  # each device draws its own augmentations
        rng = jax.random.fold_in(rng, jax.lax.axis_index(state.axis_name))
    return rng


def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on `batch` {"image", "label"}; returns the new state and batch metrics.

    Metrics: loss (mean, smoothed and mixed as trained), accuracy (against each example's dominant
    label when mixing), learning_rate (the rate this step used).
    """
    rng = _step_rng(state)
    if state.mix is not None:  # a key of its own, split off so runs without mixing draw as before
        rng, mix_rng = jax.random.split(rng)
    images = state.preprocess(batch["image"], rng)
    # The model's random layers (stochastic depth) get a stream of their own: augmentation's
    # draws stay what they were without them.
    dropout_rng = jax.random.fold_in(rng, 1)
    labels, lam = batch["label"], None
    if state.mix is not None:
        images, lam = state.mix(images, mix_rng)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_rng},
        )
        targets = labels if lam is None else augment.mix_targets(labels, lam, logits.shape[-1])
        loss = cross_entropy(logits, targets, state.label_smoothing).mean()
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    scored = labels if lam is None else augment.dominant_labels(labels, lam)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == scored)}
    if state.axis_name is not None:
        grads, metrics = jax.lax.pmean((grads, metrics), state.axis_name)
    if state.learning_rate_fn is not None:
        metrics["learning_rate"] = jnp.asarray(state.learning_rate_fn(state.step), jnp.float32)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return new_state, metrics


def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    """Metrics on `batch` {"image", "label", optional "mask"}; padded (mask=False) examples count
    nowhere.

    Returns sums that add up exactly over an epoch (loss_sum, correct, count, confusion) and this
    batch's loss and accuracy.
    """
    images = state.preprocess(batch["image"], None)
    logits = state.apply_fn(state.variables, images, train=False)
    labels = batch["label"]
    mask = batch.get("mask", jnp.ones(labels.shape, bool))
    weights = mask.astype(jnp.float32)
    predictions = jnp.argmax(logits, -1)
    sums = {
        "loss_sum": jnp.sum(cross_entropy(logits, labels) * weights),
        "correct": jnp.sum((predictions == labels) * weights),
        "count": jnp.sum(weights),
        "confusion": metrics_lib.confusion_matrix(labels, predictions, logits.shape[-1], mask),
    }
    if state.axis_name is not None:
        sums = jax.lax.psum(sums, state.axis_name)
    count = jnp.maximum(sums["count"], 1.0)
    return {**sums, "loss": sums["loss_sum"] / count, "accuracy": sums["correct"] / count}
