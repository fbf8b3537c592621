"""Optimizers and learning-rate schedules: one registry, each entry built from optax.

The names are those the reports compare: SGD with momentum, Adam, AdamW and RMSprop, and LARS and
LAMB for large batches; constant, cosine, step, exponential and time-based schedules, each with an
optional linear warmup from 0.

Each optimizer and schedule is defined once, in OPTIMIZERS or SCHEDULES: its name, its config
options (key, default, meaning, limit), how its epoch-based options become steps, and how optax
builds it. The config's validation (config_utils), its defaults (base_config), the trainer's
builders and the README's lists all read them from here: a new schedule is one entry.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array | int], jax.Array]
Limit = tuple[str, Callable[[Any], bool]]  # (the requirement as users read it, the test)


@dataclasses.dataclass(frozen=True)
class Option:
    """A key of the config's optimizer or schedule section: its default, meaning and limit."""

    key: str
    default: Any
    help: str
    limit: Limit | None = None


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer. `build(learning_rate, **options)` is its optax transformation, whose keyword
    arguments are the config `options` of the same names (their defaults are make_optimizer's).
    With `applies_weight_decay`, build also takes (weight_decay, mask) and applies them itself
    (adamw decoupled; lars and lamb also mask their trust ratio with them)."""

    build: Callable[..., optax.GradientTransformation]
    options: tuple[Option, ...] = ()
    applies_weight_decay: bool = False


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """A schedule. `build(base_lr, total_steps, warmup_steps, **kwargs)` is its part after the
    warmup; `to_steps(options, base_lr, steps_per_epoch)` turns the config's epoch-based
    `options` into build's keyword arguments (make_schedule's, in steps)."""

    build: Callable[..., Schedule]
    options: tuple[Option, ...] = ()
    to_steps: Callable[[Mapping[str, Any], float, int], dict[str, Any]] = lambda o, peak, n: {}


IN_0_1: Limit = ("in [0, 1)", lambda v: 0 <= v < 1)
POSITIVE: Limit = ("> 0", lambda v: v > 0)
NON_NEGATIVE: Limit = (">= 0", lambda v: v >= 0)

# --- Optimizers ----------------------------------------------------------------------------------

# The optimizers' own options: one config key each, shared by the optimizers that list it.
MOMENTUM = Option("momentum", 0.9, "momentum; 0 = none", IN_0_1)
NESTEROV = Option("nesterov", False, "Nesterov momentum")
B1 = Option("b1", 0.9, "first-moment decay", IN_0_1)
B2 = Option("b2", 0.999, "second-moment decay", IN_0_1)
EPS = Option("eps", 1e-8, "denominator epsilon", POSITIVE)
DECAY = Option("decay", 0.9, "decay of the squared-gradient average", IN_0_1)
CENTERED = Option("centered", False, "divide by the gradient's variance, not its raw moment")
TRUST_COEFFICIENT = Option(
    "trust_coefficient", 1e-3,
    "lars: each layer's rate is learning_rate * trust_coefficient * |w| / |g + weight_decay * w|",
    POSITIVE,
)  # fmt: skip


def _sgd(learning_rate: float | Schedule, *, momentum: float = 0.0, nesterov: bool = False):
    return optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov)


def _adam(learning_rate: float | Schedule, *, b1=0.9, b2=0.999, eps=1e-8):
    return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)


def _adamw(learning_rate: float | Schedule, weight_decay, mask, *, b1=0.9, b2=0.999, eps=1e-8):
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)


def _rmsprop(learning_rate: float | Schedule, *, decay=0.9, eps=1e-8, momentum=0.0, centered=False):
    # eps outside the square root, as torch and Keras place it.
    return optax.rmsprop(
        learning_rate, decay=decay, eps=eps, eps_in_sqrt=False, centered=centered,
        momentum=momentum or None,
    )  # fmt: skip


def _lars(
    learning_rate: float | Schedule,
    weight_decay,
    mask,
    *,
    momentum=0.9,
    nesterov=False,
    trust_coefficient=1e-3,
    eps=1e-8,
):
    # Weight decay and the trust ratio skip what the mask leaves out (BN, biases), as SimCLR's
    # LARS and timm's Lars (which adapts only decayed groups) do.
    mask = True if mask is None else mask
    return optax.lars(
        learning_rate, weight_decay=weight_decay, weight_decay_mask=mask,
        trust_coefficient=trust_coefficient, eps=eps, trust_ratio_mask=mask, momentum=momentum,
        nesterov=nesterov,
    )  # fmt: skip


def _lamb(learning_rate: float | Schedule, weight_decay, mask, *, b1=0.9, b2=0.999, eps=1e-8):
    # optax.lamb, but its trust ratio masked like its weight decay (BN and biases neither decayed
    # nor adapted, as in the LAMB reference code and timm's Lamb): optax.lamb adapts everything.
    trust_ratio = optax.scale_by_trust_ratio()
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay, mask),
        optax.masked(trust_ratio, mask) if mask else trust_ratio,
        optax.scale_by_learning_rate(learning_rate),
    )


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(_sgd, options=(MOMENTUM, NESTEROV)),
    "adam": OptimizerSpec(_adam, options=(B1, B2, EPS)),
    "adamw": OptimizerSpec(_adamw, options=(B1, B2, EPS), applies_weight_decay=True),
    "rmsprop": OptimizerSpec(_rmsprop, options=(DECAY, EPS, MOMENTUM, CENTERED)),
    "lars": OptimizerSpec(
        _lars, options=(MOMENTUM, NESTEROV, TRUST_COEFFICIENT, EPS), applies_weight_decay=True
    ),
    "lamb": OptimizerSpec(_lamb, options=(B1, B2, EPS), applies_weight_decay=True),
}

# --- Schedules (each is the part after the warmup; steps count from the start of training) ------


def _constant(base_lr: float, total_steps: int, warmup_steps: int) -> Schedule:
    return optax.constant_schedule(base_lr)


def _cosine(base_lr: float, total_steps: int, warmup_steps: int, *, final_lr=0.0) -> Schedule:
    alpha = final_lr / base_lr if base_lr else 0.0
    return optax.cosine_decay_schedule(base_lr, total_steps - warmup_steps, alpha=alpha)


def _step(
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    *,
    boundaries: Sequence[int] | None = None,  # None: 50% and 75% of training
    decay_factor: float = 0.1,
) -> Schedule:
    boundaries = boundaries or (total_steps // 2, total_steps * 3 // 4)
    # The joined schedule sees steps counted from the end of warmup. Coinciding boundaries (e.g.
    # the defaults of a very short run) each decay once, so their factors multiply.
    scales: dict[int, float] = {}
    for boundary in boundaries:
        key = int(boundary) - warmup_steps
        scales[key] = scales.get(key, 1.0) * decay_factor
    return optax.piecewise_constant_schedule(base_lr, scales)


def _exponential(
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    *,
    decay_rate: float = 0.1,
    decay_steps: int | None = None,  # None: the whole run after warmup
) -> Schedule:
    return optax.exponential_decay(base_lr, decay_steps or total_steps - warmup_steps, decay_rate)


def _time_based(base_lr: float, total_steps: int, warmup_steps: int, *, decay=1e-3) -> Schedule:
    # Keras' classic time-based decay; optax has no inverse-time schedule.
    return lambda step: base_lr / (1.0 + decay * jnp.asarray(step, jnp.float32))


def _increasing_positive(epochs: Sequence[float]) -> bool:
    return all(e > 0 for e in epochs) and list(epochs) == sorted(set(epochs))


# The schedules' own options, in epochs: to_steps turns them into build's steps.
FINAL_LR_FRACTION = Option(
    "final_lr_fraction", 0.0, "the last rate as a fraction of the peak",
    ("in [0, 1]", lambda v: 0 <= v <= 1),
)  # fmt: skip
BOUNDARIES_EPOCHS = Option(
    "boundaries_epochs", (),
    "epochs at which the rate is multiplied by decay_factor; () = at 50% and 75% of training",
    ("increasing epochs > 0, e.g. (100, 150)", _increasing_positive),
)  # fmt: skip
DECAY_FACTOR = Option("decay_factor", 0.1, "the factor at each boundary", POSITIVE)
DECAY_RATE = Option(
    "decay_rate", 0.1, "the rate is multiplied by this every decay_epochs", POSITIVE
)
DECAY_EPOCHS = Option(
    "decay_epochs", 0.0, "see decay_rate; 0 = the whole run",
    (">= 0 (0 = the whole run)", lambda v: v >= 0),
)  # fmt: skip
DECAY_PER_EPOCH = Option(
    "decay_per_epoch", 0.05, "rate = peak / (1 + decay_per_epoch * epoch)", NON_NEGATIVE
)

# to_steps(o, peak, per_epoch): o the config's schedule section, peak the base rate, per_epoch
# the steps per epoch.
SCHEDULES: dict[str, ScheduleSpec] = {
    "constant": ScheduleSpec(_constant),
    "cosine": ScheduleSpec(
        _cosine,
        options=(FINAL_LR_FRACTION,),
        to_steps=lambda o, peak, per_epoch: {"final_lr": o["final_lr_fraction"] * peak},
    ),
    "step": ScheduleSpec(
        _step,
        options=(BOUNDARIES_EPOCHS, DECAY_FACTOR),
        to_steps=lambda o, peak, per_epoch: {
            "boundaries": [round(e * per_epoch) for e in o["boundaries_epochs"]] or None,
            "decay_factor": o["decay_factor"],
        },
    ),
    "exponential": ScheduleSpec(
        _exponential,
        options=(DECAY_RATE, DECAY_EPOCHS),
        to_steps=lambda o, peak, per_epoch: {
            "decay_rate": o["decay_rate"],
            "decay_steps": round(o["decay_epochs"] * per_epoch) or None,
        },
    ),
    "time_based": ScheduleSpec(
        _time_based,
        options=(DECAY_PER_EPOCH,),
        to_steps=lambda o, peak, per_epoch: {"decay": o["decay_per_epoch"] / per_epoch},
    ),
}

OPTIMIZER_NAMES = tuple(OPTIMIZERS)
SCHEDULE_NAMES = tuple(SCHEDULES)

# --- The config sections -------------------------------------------------------------------------

# The keys every optimizer (make_optimizer's own arguments; grad_accumulation_steps is the train
# step's) and every schedule reads.
OPTIMIZER_COMMON = (
    Option("name", "sgd", f"the optimizer: {', '.join(OPTIMIZER_NAMES)}"),
    Option(
        "learning_rate", 0.1,
        "the peak learning rate for a batch of 128 images: the run uses learning_rate * "
        "batch_size / 128 (linear scaling), and logs the rate it uses",
        ("> 0 (the peak rate for 128 images)", lambda v: v > 0),
    ),
    Option(
        "weight_decay", 5e-4,
        "L2 added to the gradient (decoupled for adamw and lamb; before the trust ratio for lars)",
        NON_NEGATIVE,
    ),
    Option(
        "decay_all_params", False,
        "False: weight decay (and lars/lamb's trust ratio) on conv/dense kernels only, not BN",
    ),
    Option(
        "grad_clip_norm", 0.0, "clip the global gradient norm to this; 0 = no clipping",
        (">= 0 (0 = no clipping)", lambda v: v >= 0),
    ),
    Option(
        "grad_accumulation_steps", 1,
        "split each step's batch_size images into this many micro-batches, run one after "
        "another, and make one update from their mean gradient (for batches larger than the "
        "devices hold; steps, epochs and schedules still count updates of batch_size images)",
        (">= 1 (1 = no accumulation)", lambda v: v >= 1),
    ),
)  # fmt: skip
SCHEDULE_COMMON = (
    Option("name", "cosine", f"the learning-rate schedule: {', '.join(SCHEDULE_NAMES)}"),
    Option(
        "warmup_epochs", 0.0, "linear warmup from 0 to the peak rate; the decay follows it",
        NON_NEGATIVE,
    ),
)  # fmt: skip
# The config's sections by name: (the keys all names read, the names with their own keys).
SECTIONS: dict[str, tuple[tuple[Option, ...], Mapping[str, OptimizerSpec | ScheduleSpec]]] = {
    "optimizer": (OPTIMIZER_COMMON, OPTIMIZERS),
    "schedule": (SCHEDULE_COMMON, SCHEDULES),
}


def config_options(section: str) -> dict[str, Option]:
    """Every key of the config's "optimizer" or "schedule" section, by key: the common ones, then
    each name's own (an option several names share appears once)."""
    common, specs = SECTIONS[section]
    options = {option.key: option for option in common}
    for spec in specs.values():
        options.update({option.key: option for option in spec.options})
    return options


def used_by(section: str, key: str) -> tuple[str, ...]:
    """The names of `section` that read its option `key` (all of them for a common key)."""
    common, specs = SECTIONS[section]
    if any(option.key == key for option in common):
        return tuple(specs)
    return tuple(name for name, spec in specs.items() if any(o.key == key for o in spec.options))


def _options(kind: str, name: str, registry: Mapping[str, Any], given: dict[str, Any]):
    """The keyword-only defaults of `name`'s build, overridden by `given`; a ValueError naming
    the valid choices for an unknown name or an option its build does not take."""
    if name not in registry:
        raise ValueError(f"Unknown {kind} {name!r}; valid choices are: {', '.join(registry)}.")
    defaults = {
        p.name: p.default
        for p in inspect.signature(registry[name].build).parameters.values()
        if p.kind is p.KEYWORD_ONLY
    }
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        valid = ", ".join(defaults) or "none"
        raise ValueError(
            f"The {kind} {name!r} takes no option {', '.join(map(repr, unknown))}; "
            f"its options are: {valid}."
        )
    return {**defaults, **given}


def make_schedule(
    name: str, base_lr: float, total_steps: int, warmup_steps: int = 0, **kwargs: Any
) -> Schedule:
    """A learning-rate schedule by name, as a function of the optimizer step.

    constant; cosine (to `final_lr`); step (multiply by `decay_factor` at each of `boundaries`,
    absolute steps); exponential (base * decay_rate^(t/decay_steps)); time_based (base / (1 +
    decay * t)). With `warmup_steps`, the lr rises linearly from 0 and the decay starts after it.
    """
    options = _options("schedule", name, SCHEDULES, kwargs)
    if base_lr < 0 or total_steps <= 0 or not 0 <= warmup_steps < max(total_steps, 1):
        raise ValueError(
            f"Schedule needs base_lr >= 0, total_steps > 0 and 0 <= warmup_steps < total_steps; "
            f"got base_lr={base_lr}, total_steps={total_steps}, warmup_steps={warmup_steps}."
        )
    main = SCHEDULES[name].build(base_lr, total_steps, warmup_steps, **options)
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
    """An optax optimizer by name: sgd (momentum, nesterov), adam, adamw (b1, b2, eps), rmsprop
    (decay, eps, momentum, centered), lars (momentum, nesterov, trust_coefficient, eps), lamb
    (b1, b2, eps).

    `weight_decay` is coupled L2 (added to the gradient, as torch's `weight_decay`) for sgd, adam
    and rmsprop, decoupled for adamw and lamb, and added to the gradient before the trust ratio
    for lars; it applies to kernels only unless `decay_all_params`, and so do lars' and lamb's
    trust ratios.
    `grad_clip_norm` > 0 clips the global gradient norm first.
    """
    options = _options("optimizer", name, OPTIMIZERS, kwargs)
    if weight_decay < 0 or grad_clip_norm < 0:
        raise ValueError(
            f"weight_decay and grad_clip_norm must be >= 0; got {weight_decay}, {grad_clip_norm}."
        )
    spec, mask = OPTIMIZERS[name], None if decay_all_params else kernels_only
    transforms = []
    if grad_clip_norm:
        transforms.append(optax.clip_by_global_norm(grad_clip_norm))
    if spec.applies_weight_decay:
        base = spec.build(learning_rate, weight_decay, mask, **options)
    else:
        base = spec.build(learning_rate, **options)
        if weight_decay:
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
