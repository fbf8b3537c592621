"""Optimizers and learning-rate schedules, all built from optax by name.

The names are those the reports compare: SGD with momentum, Adam, AdamW and RMSprop; constant,
cosine, step, exponential and time-based schedules, each with an optional linear warmup from 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array | int], jax.Array]

SCHEDULE_NAMES = ("constant", "cosine", "step", "exponential", "time_based")
OPTIMIZER_NAMES = ("sgd", "adam", "adamw", "rmsprop")

# The keyword arguments each schedule and optimizer takes beyond the common ones, with defaults.
SCHEDULE_OPTIONS: dict[str, dict[str, Any]] = {
    "constant": {},
    "cosine": {"final_lr": 0.0},
    "step": {"boundaries": None, "decay_factor": 0.1},  # boundaries None: 50% and 75% of training
    "exponential": {"decay_rate": 0.1, "decay_steps": None},  # decay_steps None: the whole run
    "time_based": {"decay": 1e-3},
}
OPTIMIZER_OPTIONS: dict[str, dict[str, Any]] = {
    "sgd": {"momentum": 0.0, "nesterov": False},
    "adam": {"b1": 0.9, "b2": 0.999, "eps": 1e-8},
    "adamw": {"b1": 0.9, "b2": 0.999, "eps": 1e-8},
    "rmsprop": {"decay": 0.9, "eps": 1e-8, "momentum": 0.0, "centered": False},
}


def _options(kind: str, name: str, table: dict[str, dict[str, Any]], given: dict[str, Any]):
    if name not in table:
        raise ValueError(f"Unknown {kind} {name!r}; valid choices are: {', '.join(table)}.")
    unknown = sorted(set(given) - set(table[name]))
    if unknown:
        valid = ", ".join(table[name]) or "none"
        raise ValueError(
            f"The {kind} {name!r} takes no option {', '.join(map(repr, unknown))}; "
            f"its options are: {valid}."
        )
    return {**table[name], **given}


def _time_based(base_lr: float, decay: float) -> Schedule:
    # Keras' classic time-based decay; optax has no inverse-time schedule.
    return lambda step: base_lr / (1.0 + decay * jnp.asarray(step, jnp.float32))


def make_schedule(
    name: str, base_lr: float, total_steps: int, warmup_steps: int = 0, **kwargs: Any
) -> Schedule:
    """A learning-rate schedule by name, as a function of the optimizer step.

    constant; cosine (to `final_lr`); step (multiply by `decay_factor` at each of `boundaries`,
    absolute steps); exponential (base * decay_rate^(t/decay_steps)); time_based (base / (1 +
    decay * t)). With `warmup_steps`, the lr rises linearly from 0 and the decay starts after it.
    """
    opts = _options("schedule", name, SCHEDULE_OPTIONS, kwargs)
    if base_lr < 0 or total_steps <= 0 or not 0 <= warmup_steps < max(total_steps, 1):
        raise ValueError(
            f"Schedule needs base_lr >= 0, total_steps > 0 and 0 <= warmup_steps < total_steps; "
            f"got base_lr={base_lr}, total_steps={total_steps}, warmup_steps={warmup_steps}."
        )
    decay_steps = total_steps - warmup_steps
    if name == "constant":
        main = optax.constant_schedule(base_lr)
    elif name == "cosine":
        alpha = opts["final_lr"] / base_lr if base_lr else 0.0
        main = optax.cosine_decay_schedule(base_lr, decay_steps, alpha=alpha)
    elif name == "step":
        boundaries: Sequence[int] = opts["boundaries"] or (total_steps // 2, total_steps * 3 // 4)
        # The joined schedule sees steps counted from the end of warmup. Coinciding boundaries
        # (e.g. the defaults of a very short run) each decay once, so their factors multiply.
        scales: dict[int, float] = {}
        for b in boundaries:
            key = int(b) - warmup_steps
            scales[key] = scales.get(key, 1.0) * opts["decay_factor"]
        main = optax.piecewise_constant_schedule(base_lr, scales)
    elif name == "exponential":
        transition_steps = opts["decay_steps"] or decay_steps
        main = optax.exponential_decay(base_lr, transition_steps, opts["decay_rate"])
    else:
        main = _time_based(base_lr, opts["decay"])
    if not warmup_steps:
        return main
    warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
    return optax.join_schedules([warmup, main], [warmup_steps])


def kernels_only(params: Any) -> Any:
    """A mask that is True for conv and dense kernels: weight decay skips BN and biases."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def make_optimizer(
    name: str,
    learning_rate: float | Schedule,
    *,
    weight_decay: float = 0.0,
    decay_all_params: bool = False,
    grad_clip_norm: float = 0.0,
    **kwargs: Any,
) -> optax.GradientTransformation:
    """An optax optimizer by name: sgd (momentum, nesterov), adam, adamw, rmsprop (decay, momentum,
    centered).

    `weight_decay` is coupled L2 (added to the gradient, as torch's `weight_decay`) for sgd, adam
    and rmsprop, and decoupled for adamw; it applies to kernels only unless `decay_all_params`.
    `grad_clip_norm` > 0 clips the global gradient norm first.
    """
    opts = _options("optimizer", name, OPTIMIZER_OPTIONS, kwargs)
    if weight_decay < 0 or grad_clip_norm < 0:
        raise ValueError(
            f"weight_decay and grad_clip_norm must be >= 0; got {weight_decay}, {grad_clip_norm}."
        )
    mask = None if decay_all_params else kernels_only
    if name == "sgd":
        momentum = opts["momentum"] or None
        base = optax.sgd(learning_rate, momentum=momentum, nesterov=opts["nesterov"])
    elif name == "adam":
        base = optax.adam(learning_rate, b1=opts["b1"], b2=opts["b2"], eps=opts["eps"])
    elif name == "adamw":
        base = optax.adamw(
            learning_rate, b1=opts["b1"], b2=opts["b2"], eps=opts["eps"],
            weight_decay=weight_decay, mask=mask,
        )  # fmt: skip
    else:
        # eps outside the square root, as torch and Keras place it.
        base = optax.rmsprop(
            learning_rate, decay=opts["decay"], eps=opts["eps"], eps_in_sqrt=False,
            centered=opts["centered"], momentum=opts["momentum"] or None,
        )  # fmt: skip
    transforms = []
    if grad_clip_norm:
        transforms.append(optax.clip_by_global_norm(grad_clip_norm))
    if weight_decay and name != "adamw":
        transforms.append(optax.add_decayed_weights(weight_decay, mask=mask))
    return optax.chain(*transforms, base)


def freeze(tx: optax.GradientTransformation, is_frozen: Callable[[tuple[str, ...]], bool]):
    """Wrap `tx` so that params whose path (a tuple of names) `is_frozen` never change.

    Frozen params get zero updates (optax.set_to_zero) and no optimizer state.
    """

    def labels(params: Any) -> Any:
        def label(path, _):
            return "frozen" if is_frozen(tuple(k.key for k in path)) else "trainable"

        return jax.tree_util.tree_map_with_path(label, params)

    return optax.partition({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
