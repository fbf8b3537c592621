"""TrainState and the pure train/eval steps that every mode (plain, jit-sharded, pmap) compiles.

A step takes a batch of raw images (uint8 or float, NHWC) and does everything on the device:
augment with a per-step rng, normalize, mix (mixup/CutMix, optional), forward with mutable
batch_stats, float32 loss, grads, and the optax update. Under pmap (the model built with
`axis_name`) grads and metrics are averaged across devices with `lax.pmean` and BatchNorm uses
cross-device statistics; each device mixes its own shard, with its own lam.

With `grad_accumulation_steps` k > 1, one step is still one optimizer update on the whole batch:
its gradient is the mean over k micro-batches of batch/k examples, run one after another (a
`lax.scan`, as big_vision's `accumulate_gradient`), so only a micro-batch's activations are held;
mixing then pairs images within each micro-batch.
With an EMA (`EmaTrainState`), each update also moves the average of the weights.
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
    grad_accumulation_steps: int = struct.field(pytree_node=False, default=1)

    @property
    def variables(self) -> dict[str, Any]:
        """What `model.apply` takes: {"params", "batch_stats"}."""
        return {"params": self.params, "batch_stats": self.batch_stats}

    def update_ema(self) -> TrainState:
        """After an optimizer update: move the weights' average, where there is one (see
        EmaTrainState); a plain TrainState keeps none."""
        return self


class EmaTrainState(TrainState):
    """A TrainState that also keeps an exponential moving average of the weights: of params AND
    batch_stats, as timm's ModelEmaV2 averages the whole state_dict, BatchNorm buffers included.

    A subclass, not optional fields, so that the checkpoints of runs without an EMA keep the tree
    they always had (orbax restores only an identical tree).
    """

    ema_params: Any = None
    ema_batch_stats: Any = None
    ema_decay: float = struct.field(pytree_node=False, default=0.0)
    ema_warmup: bool = struct.field(pytree_node=False, default=False)

    @property
    def ema_variables(self) -> dict[str, Any]:
        """The averaged {"params", "batch_stats"}."""
        return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}

    def with_ema_weights(self) -> EmaTrainState:
        """This state with the averaged weights in place of the trained ones (for evaluation)."""
        return self.replace(params=self.ema_params, batch_stats=self.ema_batch_stats)

    def decay_at(self, updates: jax.Array) -> jax.Array:
        """The decay after `updates` optimizer updates: ema_decay, or with `ema_warmup`
        min(ema_decay, (1 + t) / (10 + t)) (TensorFlow's ExponentialMovingAverage with
        num_updates = t), so that early averages do not hold on to the initial weights."""
        decay = jnp.asarray(self.ema_decay, jnp.float32)
        if not self.ema_warmup:
            return decay
        t = jnp.asarray(updates, jnp.float32)
        return jnp.minimum(decay, (1.0 + t) / (10.0 + t))

    def update_ema(self) -> EmaTrainState:
        """After an optimizer update: average <- d * average + (1 - d) * weights, where d is the
        decay after `step` updates (this one included)."""
        step_size = 1.0 - self.decay_at(self.step)
        return self.replace(
            ema_params=optax.incremental_update(self.params, self.ema_params, step_size),
            ema_batch_stats=optax.incremental_update(
                self.batch_stats, self.ema_batch_stats, step_size
            ),
        )


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
    grad_accumulation_steps: int = 1,
    ema_decay: float = 0.0,
    ema_warmup: bool = False,
) -> TrainState:
    """Initialize the model (or take given `variables`, e.g. pretrained) and the optimizer state.

    `rng` seeds both the init and the per-step augmentation. `preprocess(images, rng)` runs inside
    the steps (rng=None at eval); `mix(images, rng)` (e.g. augment.Mix) after it in the train
    step. The pmap axis name is taken from `model.axis_name`. Each step accumulates the gradients
    of `grad_accumulation_steps` micro-batches; `ema_decay` > 0 gives an EmaTrainState whose
    average starts at the initial weights.
    """
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    init_rng, step_rng = jax.random.split(rng)
    if variables is None:
        init = jax.jit(lambda r: model.init(r, jnp.zeros(input_shape, jnp.float32), train=False))
        variables = init(init_rng)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    fields = dict(
        step=jnp.asarray(0, jnp.int32),
        apply_fn=model.apply,
        params=params,
        tx=tx,
        opt_state=tx.init(params),
        batch_stats=batch_stats,
        rng=step_rng,
        preprocess=preprocess,
        label_smoothing=label_smoothing,
        axis_name=getattr(model, "axis_name", None),
        learning_rate_fn=learning_rate_fn,
        mix=mix,
        grad_accumulation_steps=grad_accumulation_steps,
    )
    if not ema_decay:
        return TrainState(**fields)
    # Copies: a donated state must not hold one buffer twice.
    return EmaTrainState(
        **fields,
        ema_params=jax.tree.map(jnp.array, params),
        ema_batch_stats=jax.tree.map(jnp.array, batch_stats),
        ema_decay=ema_decay,
        ema_warmup=ema_warmup,
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


def _gradients(
    state: TrainState, batch_stats: Any, batch: Batch, rng: jax.Array
) -> tuple[Any, Any, dict[str, jax.Array]]:
    """This device's gradients on `batch`, the BatchNorm statistics after it, and its metrics."""
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
            {"params": params, "batch_stats": batch_stats},
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
    return grads, batch_stats, metrics


def _accumulated_gradients(
    state: TrainState, batch: Batch, rng: jax.Array
) -> tuple[Any, Any, dict[str, jax.Array]]:
    """`_gradients` averaged over grad_accumulation_steps micro-batches, run in sequence (each
    updates the BatchNorm statistics, as torch's accumulation loops do). Micro-batch i holds
    examples i, i + k, i + 2k, ... so that each is spread over every device's share."""
    k = state.grad_accumulation_steps

    def micro_batches(x: jax.Array) -> jax.Array:
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    def accumulate(carry, inputs):
        grad_sum, batch_stats = carry
        index, micro_batch = inputs
        grads, batch_stats, metrics = _gradients(
            state, batch_stats, micro_batch, jax.random.fold_in(rng, index)
        )
        return (jax.tree.map(jnp.add, grad_sum, grads), batch_stats), metrics

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    inputs = (jnp.arange(k), jax.tree.map(micro_batches, batch))
    (grad_sum, batch_stats), metrics = jax.lax.scan(accumulate, (zeros, state.batch_stats), inputs)
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    return grads, batch_stats, jax.tree.map(jnp.mean, metrics)


def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on `batch` {"image", "label"}; returns the new state and batch metrics.

    Metrics: loss (mean, smoothed and mixed as trained), accuracy (against each example's dominant
    label when mixing), learning_rate (the rate this step used).
    """
    if state.grad_accumulation_steps > 1:
        grads, batch_stats, metrics = _accumulated_gradients(state, batch, _step_rng(state))
    else:
        grads, batch_stats, metrics = _gradients(state, state.batch_stats, batch, _step_rng(state))
    if state.axis_name is not None:
        grads, metrics = jax.lax.pmean((grads, metrics), state.axis_name)
    if state.learning_rate_fn is not None:
        metrics["learning_rate"] = jnp.asarray(state.learning_rate_fn(state.step), jnp.float32)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return new_state.update_ema(), metrics


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
