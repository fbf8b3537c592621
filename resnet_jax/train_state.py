"""The train state and the pure train/eval steps every mode (plain, jit-sharded, pmap) compiles.

The state holds what changes from step to step (params, optimizer state, BatchNorm statistics,
the augmentation rng, the step count) with `apply_fn` and `tx`, as Flax's TrainState does. What a
step does is built, not carried in the state:

    step = TrainStep(preprocess=..., mix=..., label_smoothing=0.1, learning_rate_fn=schedule)
    state, metrics = jax.jit(step, donate_argnums=0)(state, {"image": ..., "label": ...})
    evaluate = EvalStep(model.apply, preprocess=...)   # needs no optimizer state
    metrics = jax.jit(evaluate)(state.variables, {"image": ..., "label": ..., "mask": ...})

A train step takes a batch of raw images (uint8 or float, NHWC) and does everything on the device:
augment with a per-step rng, normalize, mix (mixup/CutMix, optional), forward with mutable
batch_stats, float32 loss, grads, and the optax update. Under pmap (`axis_name`, the one the model
was built with) grads and metrics are averaged across devices with `lax.pmean` and BatchNorm uses
cross-device statistics; each device mixes its own shard, with its own lam.

With `grad_accumulation_steps` k > 1, one step is still one optimizer update on the whole batch:
its gradient is the mean over k micro-batches of batch/k examples, run one after another (a
`lax.scan`, as big_vision's `accumulate_gradient`), so only a micro-batch's activations are held;
mixing then pairs images within each micro-batch. With `ema_decay` > 0 (and an `EmaTrainState`),
each update also moves the average of the weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state as flax_train_state

from resnet_jax import augment
from resnet_jax import metrics as metrics_lib

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
Preprocess = Callable[[jax.Array, jax.Array | None], jax.Array]
# (images, rng) -> (mixed images, lam): augment.Mix
Mix = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def cast_to_float(images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """The default preprocessing: images are already normalized floats; just cast."""
    del rng
    return images.astype(jnp.float32)


class TrainState(flax_train_state.TrainState):
    """Flax's TrainState plus the BatchNorm statistics and the augmentation rng."""

    batch_stats: Any
    rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays

    @property
    def variables(self) -> dict[str, Any]:
        """What `model.apply` takes: {"params", "batch_stats"}."""
        return {"params": self.params, "batch_stats": self.batch_stats}


class EmaTrainState(TrainState):
    """A TrainState that also keeps an exponential moving average of the weights: of params AND
    batch_stats, as timm's ModelEmaV2 averages the whole state_dict, BatchNorm buffers included.

    A subclass, not optional fields, so that the checkpoints of runs without an EMA keep the tree
    they always had (orbax restores only an identical tree).
    """

    ema_params: Any = None
    ema_batch_stats: Any = None

    @property
    def ema_variables(self) -> dict[str, Any]:
        """The averaged {"params", "batch_stats"}."""
        return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}


def create(
    model: nn.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    input_shape: Sequence[int],
    *,
    variables: dict[str, Any] | None = None,
    ema: bool = False,
) -> TrainState:
    """Initialize the model (or take given `variables`, e.g. pretrained) and the optimizer state.

    `rng` seeds both the init and the per-step augmentation. `ema=True` gives an EmaTrainState,
    whose average starts at the initial weights (train it with a `TrainStep(ema_decay=...)`).
    """
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    init_rng, step_rng = jax.random.split(rng)
    if variables is None:
        init = jax.jit(lambda r: model.init(r, jnp.zeros(input_shape, jnp.float32), train=False))
        variables = init(init_rng)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    state = TrainState(
        step=jnp.asarray(0, jnp.int32),
        apply_fn=model.apply,
        params=params,
        tx=tx,
        opt_state=tx.init(params),
        batch_stats=batch_stats,
        rng=step_rng,
    )
    if not ema:
        return state
    # Copies: a donated state must not hold one buffer twice.
    return EmaTrainState(
        **{field.name: getattr(state, field.name) for field in dataclasses.fields(state)},
        ema_params=jax.tree.map(jnp.array, params),
        ema_batch_stats=jax.tree.map(jnp.array, batch_stats),
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


def ema_decay_at(decay: float, warmup: bool, updates: jax.Array) -> jax.Array:
    """The EMA's decay after `updates` optimizer updates: `decay`, or with `warmup`
    min(decay, (1 + t) / (10 + t)) (TensorFlow's ExponentialMovingAverage with num_updates = t),
    so that early averages do not hold on to the initial weights."""
    decay = jnp.asarray(decay, jnp.float32)
    if not warmup:
        return decay
    t = jnp.asarray(updates, jnp.float32)
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """A pure train step, `step(state, batch) -> (state, metrics)`, built from its settings.

    `preprocess(images, rng)` augments and normalizes (e.g. augment.Preprocess); `mix(images, rng)`
    (e.g. augment.Mix) mixes after it; `label_smoothing` smooths the targets;
    `learning_rate_fn(step)` (the schedule) is reported as the "learning_rate" metric;
    `grad_accumulation_steps` micro-batches make each update; `ema_decay` > 0 (with `ema_warmup`)
    moves an EmaTrainState's average after each update; `axis_name` is the pmap axis to average
    over (the model's BatchNorm must be built with the same one).
    """

    preprocess: Preprocess = cast_to_float
    mix: Mix | None = None
    label_smoothing: float = 0.0
    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None
    grad_accumulation_steps: int = 1
    ema_decay: float = 0.0
    ema_warmup: bool = False
    axis_name: str | None = None

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        """One optimizer update on `batch` {"image", "label"}; returns the new state and metrics.

        Metrics: loss (mean, smoothed and mixed as trained), accuracy (against each example's
        dominant label when mixing), learning_rate (the rate this step used, with a schedule).
        """
        assert isinstance(state, EmaTrainState) == (self.ema_decay > 0), "EMA state and decay"
        rng = jax.random.fold_in(state.rng, state.step)
        if self.axis_name is not None:  # each device draws its own augmentations
            rng = jax.random.fold_in(rng, jax.lax.axis_index(self.axis_name))
        if self.grad_accumulation_steps > 1:
            grads, batch_stats, metrics = self._accumulated_gradients(state, batch, rng)
        else:
            grads, batch_stats, metrics = self._gradients(state, state.batch_stats, batch, rng)
        if self.axis_name is not None:
            grads, metrics = jax.lax.pmean((grads, metrics), self.axis_name)
        if self.learning_rate_fn is not None:
            metrics["learning_rate"] = jnp.asarray(self.learning_rate_fn(state.step), jnp.float32)
        state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        if self.ema_decay:
            step_size = 1.0 - ema_decay_at(self.ema_decay, self.ema_warmup, state.step)
            state = state.replace(
                ema_params=optax.incremental_update(state.params, state.ema_params, step_size),
                ema_batch_stats=optax.incremental_update(
                    state.batch_stats, state.ema_batch_stats, step_size
                ),
            )
        return state, metrics

    def _gradients(
        self, state: TrainState, batch_stats: Any, batch: Batch, rng: jax.Array
    ) -> tuple[Any, Any, Metrics]:
        """This device's gradients on `batch`, the BatchNorm statistics after it, and metrics."""
        if self.mix is not None:  # its own key, split off so runs without mixing draw as before
            rng, mix_rng = jax.random.split(rng)
        images = self.preprocess(batch["image"], rng)
        # The model's random layers (stochastic depth) get a stream of their own: augmentation's
        # draws stay what they were without them.
        dropout_rng = jax.random.fold_in(rng, 1)
        labels, lam = batch["label"], None
        if self.mix is not None:
            images, lam = self.mix(images, mix_rng)

        def loss_fn(params):
            logits, updates = state.apply_fn(
                {"params": params, "batch_stats": batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": dropout_rng},
            )
            targets = labels if lam is None else augment.mix_targets(labels, lam, logits.shape[-1])
            loss = cross_entropy(logits, targets, self.label_smoothing).mean()
            return loss, (logits, updates["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        scored = labels if lam is None else augment.dominant_labels(labels, lam)
        metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == scored)}
        return grads, batch_stats, metrics

    def _accumulated_gradients(
        self, state: TrainState, batch: Batch, rng: jax.Array
    ) -> tuple[Any, Any, Metrics]:
        """`_gradients` averaged over grad_accumulation_steps micro-batches, run in sequence (each
        updates the BatchNorm statistics, as torch's accumulation loops do). Micro-batch i holds
        examples i, i + k, i + 2k, ... so that each is spread over every device's share."""
        k = self.grad_accumulation_steps

        def micro_batches(x: jax.Array) -> jax.Array:
            return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

        def accumulate(carry, inputs):
            grad_sum, batch_stats = carry
            index, micro_batch = inputs
            grads, batch_stats, metrics = self._gradients(
                state, batch_stats, micro_batch, jax.random.fold_in(rng, index)
            )
            return (jax.tree.map(jnp.add, grad_sum, grads), batch_stats), metrics

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        inputs = (jnp.arange(k), jax.tree.map(micro_batches, batch))
        initial = (zeros, state.batch_stats)
        (grad_sum, batch_stats), metrics = jax.lax.scan(accumulate, initial, inputs)
        grads = jax.tree.map(lambda g: g / k, grad_sum)
        return grads, batch_stats, jax.tree.map(jnp.mean, metrics)


@dataclasses.dataclass(frozen=True)
class EvalStep:
    """A pure eval step, `step(variables, batch) -> metrics`: no optimizer state needed.

    `apply_fn` is the model's apply (or a test-time augmentation of it); `preprocess(images, None)`
    is the train step's preprocessing without its random ops; `axis_name` the pmap axis to sum
    over. The batch is {"image", "label", optional "mask"}: padded (mask=False) examples count
    nowhere. Returns sums that add up exactly over an epoch (loss_sum, correct, count, confusion)
    and this batch's loss and accuracy.
    """

    apply_fn: Callable[..., jax.Array]
    preprocess: Preprocess = cast_to_float
    axis_name: str | None = None

    def __call__(self, variables: dict[str, Any], batch: Batch) -> Metrics:
        images = self.preprocess(batch["image"], None)
        logits = self.apply_fn(variables, images, train=False)
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
        if self.axis_name is not None:
            sums = jax.lax.psum(sums, self.axis_name)
        count = jnp.maximum(sums["count"], 1.0)
        return {**sums, "loss": sums["loss_sum"] / count, "accuracy": sums["correct"] / count}


# The plain steps: normalized float images, no augmentation, no schedule metric.
train_step = TrainStep()


def eval_step(state: TrainState, batch: Batch) -> Metrics:
    """`EvalStep` of the state's model on its variables (plain preprocessing)."""
    return EvalStep(state.apply_fn)(state.variables, batch)
