"""From a config to the objects of a run: dataset, plan, model, preprocessing, schedule,
optimizer, state and pretrained weights, and the compiled steps.

Training, evaluation, prediction and the experiments all build what they need from here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from resnet_jax import augment, checkpoint, config_utils, data, models, optim, parallel
from resnet_jax import train_state as ts
from resnet_jax.errors import ConfigError, DataError, UserError

REFERENCE_BATCH_SIZE = 128  # optimizer.learning_rate is the rate for this many images


def enable_compilation_cache(config: ml_collections.ConfigDict) -> None:
    """JAX's persistent compilation cache in compilation_cache_dir ("" turns it off)."""
    directory = config.compilation_cache_dir
    if not directory:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    path = Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # The default (1 s) would skip small models' steps; tiny helper jits stay out at 0.1 s.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


def build_parallel(config: ml_collections.ConfigDict) -> parallel.Parallel:
    """How the run spreads over every device: "jit" (a mesh) or "pmap"."""
    return parallel.Parallel(config.parallel)


def open_checkpoints(config: ml_collections.ConfigDict, workdir: Path) -> checkpoint.Checkpoints:
    """The run's checkpoints in workdir/checkpoints, keeping keep_checkpoints of the latest."""
    return checkpoint.Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints)


def dataset_spec(config: ml_collections.ConfigDict) -> data.DatasetSpec:
    """The config's dataset section (and seed) as what the pipelines take."""
    options = config.dataset
    return data.DatasetSpec(
        name=options.name,
        # A "~/..." from a flag is not expanded by the shell after "=", nor by tfds.
        data_dir=str(Path(options.data_dir).expanduser()) if options.data_dir else None,
        image_size=options.image_size or None,
        val_fraction=options.val_fraction,
        seed=config.seed,
        verify_checksums=options.verify_checksums,
    )


def load_dataset(config: ml_collections.ConfigDict) -> data.Dataset:
    """The config's dataset with its splits in host memory."""
    spec = dataset_spec(config)
    return data.load(
        spec.name, spec.data_dir, image_size=spec.image_size, val_fraction=spec.val_fraction,
        seed=spec.seed, verify_checksums=spec.verify_checksums,
    )  # fmt: skip


def load_batches(
    config: ml_collections.ConfigDict, eval_batch_size: int | None = None
) -> data.Batches:
    """The config's dataset as batches: in host memory, or streamed (dataset.pipeline; "auto"
    decides by the decoded train split's size). `eval_batch_size` overrides the config's."""
    from resnet_jax import stream  # grain and the host transforms: only for this choice

    options, spec = config.dataset, dataset_spec(config)
    pipeline, why = stream.choose_pipeline(spec, options.pipeline, options.memory_budget_gb)
    logging.info("Input pipeline: %s (%s).", pipeline, why)
    eval_batch_size = eval_batch_size or config.eval_batch_size
    if pipeline == "memory":
        return data.MemoryBatches(
            load_dataset(config), config.batch_size, eval_batch_size, config.seed
        )
    if not spec.image_size:
        raise ConfigError(
            "Stream mode (dataset.pipeline) crops every image on the host to dataset.image_size "
            "x dataset.image_size, which is 0: set it (224 for ImageNet-style training)."
        )
    return stream.open_stream(spec, config.batch_size, eval_batch_size, options.stream_workers)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """How a run goes, as plain values for the loop: its length in the reports' terms (an epoch
    is train examples // batch size steps, i.e. optimizer updates, each over `batch_size` images
    taken in micro-batches of `micro_batch_size`), when it logs, checkpoints and traces, and what
    it reports (which checkpoint: "best_val" or "final"; which weights: "ema" or "raw")."""

    num_train_examples: int
    batch_size: int
    micro_batch_size: int
    eval_batch_size: int
    steps_per_epoch: int
    num_epochs: int
    total_steps: int
    log_every_steps: int = 100
    checkpoint_every_epochs: int = 1
    profile_steps: tuple[int, int] = (0, 0)  # (start step, number of steps); 0 steps = no trace
    results_checkpoint: str = "best_val"
    reported_weights: str = "raw"
    model: str = ""
    dataset: str = ""
    learning_rate: float = 0.0  # optimizer.learning_rate, per REFERENCE_BATCH_SIZE images
    peak_learning_rate: float = 0.0  # scaled to batch_size


def make_plan(
    config: ml_collections.ConfigDict,
    num_train_examples: int,
    num_devices: int = 1,
    *,
    resuming: bool = False,
) -> Plan:
    """Epochs and steps (num_steps > 0 overrides num_epochs, cutting the last epoch short), after
    the run's one check of its batch arithmetic: the batch fits the train split and splits into
    equal micro-batches, and the micro-batches and the eval batch divide over the `num_devices`
    (and so over the processes, which hold equal shares of them). A `resuming` run is told it
    cannot change its batch size. Raises ConfigError (DataError, parallel.ParallelError)."""
    batch_size, accumulation = config.batch_size, config.optimizer.grad_accumulation_steps
    if batch_size > num_train_examples:
        raise DataError(
            f"The batch size {batch_size} is larger than the {num_train_examples} training "
            "examples, so an epoch would have no step: lower batch_size."
        )
    if batch_size % accumulation:
        below = max(accumulation, batch_size // accumulation * accumulation)
        raise ConfigError(
            f"optimizer.grad_accumulation_steps = {accumulation} does not divide batch_size = "
            f"{batch_size} into equal micro-batches: set batch_size to a multiple of "
            f"{accumulation} (e.g. {below} or {below + accumulation}), or another number of "
            "accumulation steps."
        )
    checks = (
        ("batch_size", batch_size, accumulation * num_devices),
        ("eval_batch_size", config.eval_batch_size, num_devices),
    )
    for name, size, multiple in checks:
        if size % multiple == 0:
            continue
        if resuming:  # another batch size would not continue the same run
            raise parallel.ParallelError(
                f"This run's {name} {size} does not divide over the {num_devices} devices here. "
                "Resume it on a device count that divides it (eval_batch_size alone may change), "
                "or start a new --workdir with another batch size."
            )
        below, above = parallel.nearest_divisible(size, multiple)
        sizes = f"{below} or {above}" if below != above else f"{below}"
        micro = (
            f" (optimizer.grad_accumulation_steps = {accumulation} splits it into micro-batches "
            f"of {size // accumulation})"
            if name == "batch_size" and accumulation > 1
            else ""
        )
        raise parallel.ParallelError(
            f"The {name.replace('_', ' ')} {size}{micro} does not divide evenly across the "
            f"{num_devices} devices of this run. Set {name} to a multiple of {multiple}, for "
            f"example {sizes} (--config.{name}={below})."
        )
    steps_per_epoch = num_train_examples // batch_size
    total_steps = config.num_steps or config.num_epochs * steps_per_epoch
    return Plan(
        num_train_examples=num_train_examples,
        batch_size=batch_size,
        micro_batch_size=batch_size // accumulation,
        eval_batch_size=config.eval_batch_size,
        steps_per_epoch=steps_per_epoch,
        num_epochs=math.ceil(total_steps / steps_per_epoch),
        total_steps=total_steps,
        log_every_steps=config.log_every_steps,
        checkpoint_every_epochs=config.checkpoint_every_epochs,
        profile_steps=(config.profile.start_step, config.profile.num_steps),
        results_checkpoint=config.results_checkpoint,
        reported_weights=reported_weights(config),
        model=config.model.name,
        dataset=config.dataset.name,
        learning_rate=config.optimizer.learning_rate,
        peak_learning_rate=peak_learning_rate(config),
    )


def reported_weights(config: ml_collections.ConfigDict) -> str:
    """The weights a run reports and picks its best checkpoint by: "ema" (their moving average)
    when it keeps one and ema.weights says so, else "raw" (the trained weights)."""
    return "ema" if config.ema.decay and config.ema.weights == "ema" else "raw"


def log_plan(
    config: ml_collections.ConfigDict, batches: data.Batches, plan: Plan, num_devices: int
) -> None:
    """State the run's data, length and learning rate in the terms the reports use."""
    sizes = batches.split_sizes
    val = f"{sizes['val']} val / " if "val" in sizes else ""
    logging.info(
        "Dataset %s: %d train / %s%d test examples, %d classes, images %s.",
        config.dataset.name, sizes["train"], val, sizes["test"], len(batches.class_names),
        "x".join(map(str, batches.image_shape)),
    )  # fmt: skip
    if "val" not in sizes and config.results_checkpoint == "best_val":
        logging.warning(
            "No validation split (dataset.val_fraction = 0): each epoch is evaluated on the test "
            "split, and the final results come from the last checkpoint, not the best."
        )
    per_device = plan.micro_batch_size // num_devices
    dropped = plan.num_train_examples - plan.steps_per_epoch * plan.batch_size
    length = (
        f"{config.num_steps} steps (num_steps; the last epoch cut short)"
        if config.num_steps
        else f"{config.num_epochs} epochs"
    )
    logging.info(
        "Training on %d examples, batch size %d (%d per device on %d %s device(s)): %d steps per "
        "epoch (%d examples dropped per epoch), %d epochs, %d steps in all (%s).",
        plan.num_train_examples, plan.batch_size, per_device, num_devices, jax.default_backend(),
        plan.steps_per_epoch, dropped, plan.num_epochs, plan.total_steps, length,
    )  # fmt: skip
    accumulation = plan.batch_size // plan.micro_batch_size
    if accumulation > 1:
        logging.info(
            "Gradient accumulation: %d optimizer updates of %d images, each the mean gradient of "
            "%d micro-batches of %d (%d per device); steps, epochs and the schedule count updates.",
            plan.total_steps, plan.batch_size, accumulation, plan.micro_batch_size, per_device,
        )  # fmt: skip
    if config.ema.decay:
        logging.info(
            "EMA of the weights: decay %g%s; the %s weights pick the best checkpoint and give the "
            "results.",
            config.ema.decay, " with warmup" if config.ema.warmup else "", plan.reported_weights,
        )  # fmt: skip
    logging.info(
        "Learning rate: peak %.4g (optimizer.learning_rate %.4g per %d images x batch %d), %s "
        "schedule, %g warmup epochs.",
        peak_learning_rate(config), config.optimizer.learning_rate, REFERENCE_BATCH_SIZE,
        config.batch_size, config.schedule.name, config.schedule.warmup_epochs,
    )  # fmt: skip


def build_model(
    config: ml_collections.ConfigDict, num_classes: int, axis_name: str | None = None
) -> models.ResNet:
    """The config's ResNet; options that its family does not have are logged and ignored."""
    name = config.model.name
    has_stem_choice = name in models.IMAGENET_FAMILY
    if not has_stem_choice and config.model.stem != "cifar":
        logging.warning(
            "Ignoring model.stem=%r: %s always has He et al.'s 3x3 CIFAR stem.",
            config.model.stem,
            name,
        )
    num_stages = models.num_stages(models.get_model(name, kernels="xla"))
    return models.get_model(
        name,
        num_classes,
        stem=config.model.stem if has_stem_choice else None,
        shortcut=config.model.shortcut or None,
        residual=config.model.residual,
        width=config.model.width or None,
        zero_init_residual=config.model.zero_init_residual,
        frozen_stages=config_utils.frozen_stages(config, num_stages),
        drop_path_rate=config.model.drop_path_rate,
        dtype=jnp.bfloat16 if config.half_precision else jnp.float32,
        axis_name=axis_name,
        kernels=config.model.kernels,
    )


def normalization_name(config: ml_collections.ConfigDict, channels: int) -> str:
    """augment.normalization, "auto" resolved: "cifar10" for CIFAR-10 from scratch, "imagenet" for
    pretrained weights (which expect it) and other RGB datasets, "dataset" for images that are not
    RGB. A ConfigError for RGB statistics asked of images that are not RGB."""
    choice = config.augment.normalization
    if choice == "auto":
        if channels != 3:
            return "dataset"
        from_scratch_on_cifar10 = config.dataset.name == "cifar10" and not config.model.pretrained
        return "cifar10" if from_scratch_on_cifar10 else "imagenet"
    if choice != "dataset" and channels != 3:
        raise ConfigError(
            f"augment.normalization = {choice!r} normalizes with {choice}'s three RGB statistics, "
            f"but the images of {config.dataset.name} have {channels} channel(s): set "
            "augment.normalization to 'dataset' (each channel's mean and std, measured on the "
            "train split) or 'auto' (the same for images that are not RGB)."
        )
    return choice


def normalization(
    config: ml_collections.ConfigDict, batches: data.Batches, saved: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The run's normalization, as its checkpoints record it: {"name", "mean", "std"} per channel
    in [0, 1] units. "dataset" measures the train split once, at the run's start (`batches`); a
    resumed run keeps the figures its checkpoint `saved`."""
    name = normalization_name(config, batches.image_shape[-1])
    if name != "dataset":
        return named_normalization(name)
    if saved and saved["name"] == "dataset":
        return saved
    start = time.perf_counter()
    mean, std = batches.channel_stats()
    logging.info(
        "Normalization: the train split's own per-channel mean %s and std %s (measured in %.1f s).",
        np.round(mean, 4).tolist(), np.round(std, 4).tolist(), time.perf_counter() - start,
    )  # fmt: skip
    return {"name": name, "mean": list(mean), "std": list(std)}


def named_normalization(name: str) -> dict[str, Any]:
    """A named normalization's record ("cifar10" or "imagenet")."""
    mean, std = augment.NAMED_STATS[name]
    return {"name": name, "mean": list(mean), "std": list(std)}


def build_preprocess(
    config: ml_collections.ConfigDict,
    image_shape: tuple[int, int, int],
    normalization: dict[str, Any],
) -> tuple[augment.Preprocess, tuple[int, ...]]:
    """The on-device augment + normalize function (with the `normalization` record's statistics),
    and the model input shape it produces."""
    height, width, channels = image_shape
    options = config.augment
    if options.crop_size > min(height, width) + 2 * options.crop_padding:
        raise ConfigError(
            f"augment.crop_size = {options.crop_size} is larger than the {height}x{width} images "
            f"padded by augment.crop_padding = {options.crop_padding}: set crop_size to at most "
            f"{min(height, width) + 2 * options.crop_padding} (or 0 for the image size)."
        )
    if not options.resize_crop and options.crop_size > min(height, width):
        raise ConfigError(
            f"augment.resize_crop = False trains at augment.crop_size = {options.crop_size} and "
            f"evaluates on the centre crop of that size, which the {height}x{width} images do "
            f"not have: set crop_size to at most {min(height, width)}, or resize_crop = True."
        )
    if options.policy != "randaugment":
        log_ignored_augment_keys(
            config,
            ("randaugment_num_ops", "randaugment_magnitude"),
            f"augment.policy is {options.policy!r}, not 'randaugment'",
        )
    if not options.random_erasing:
        log_ignored_augment_keys(
            config,
            (
                "random_erasing_min_area",
                "random_erasing_max_area",
                "random_erasing_min_aspect",
                "random_erasing_mode",
            ),
            "random erasing is off (augment.random_erasing = 0)",
        )
    preprocess = augment.make_preprocess(
        mean=normalization["mean"],
        std=normalization["std"],
        crop_padding=options.crop_padding,
        crop_size=options.crop_size or None,
        resize_crop=options.resize_crop,
        flip=options.flip,
        rotation=options.rotation,
        rotation_from_zero=options.rotation_from_zero,
        rotation_interpolation=options.rotation_interpolation,
        cutout_size=options.cutout,
        resize_to=options.resize_to or None,
        policy=options.policy,
        policy_num_ops=options.randaugment_num_ops,
        policy_magnitude=options.randaugment_magnitude,
        erasing_prob=options.random_erasing,
        erasing_min_area=options.random_erasing_min_area,
        erasing_max_area=options.random_erasing_max_area,
        erasing_min_aspect=options.random_erasing_min_aspect,
        erasing_mode=options.random_erasing_mode,
    )
    images = jax.ShapeDtypeStruct((1, height, width, channels), jnp.uint8)
    return preprocess, jax.eval_shape(preprocess, images).shape


def log_ignored_augment_keys(
    config: ml_collections.ConfigDict, keys: tuple[str, ...], reason: str
) -> None:
    """Warns of the augment `keys` changed from their defaults, which have no effect (`reason`)."""
    defaults = config_utils.default_config().augment
    changed = [f"augment.{key}" for key in keys if config.augment[key] != defaults[key]]
    if changed:
        logging.warning("Ignoring %s: %s.", ", ".join(changed), reason)


def build_mix(config: ml_collections.ConfigDict) -> augment.Mix | None:
    """The train step's mixup/CutMix, or None when both alphas are 0."""
    options = config.augment
    if not (options.mixup_alpha or options.cutmix_alpha):
        log_ignored_augment_keys(
            config, ("mix_prob", "mix_switch_prob"), "mixing is off (both alphas are 0)"
        )
    return augment.make_mix(
        options.mixup_alpha, options.cutmix_alpha, options.mix_prob, options.mix_switch_prob
    )


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
    """optimizer.learning_rate, scaled linearly from a batch of 128 to the run's batch size."""
    return config.optimizer.learning_rate * config.batch_size / REFERENCE_BATCH_SIZE


def ignored_options(config: ml_collections.ConfigDict, section: str) -> list[str]:
    """`section.key=value` for each option of the other optimizers (or schedules) than the one
    the config names that was changed from its default: a user should see it had no effect."""
    common, specs = optim.SECTIONS[section]
    chosen = config[section]
    used = {option.key for option in (*common, *specs[chosen.name].options)}
    return [
        f"{section}.{key}={chosen[key]!r}"
        for key, option in sorted(optim.config_options(section).items())
        if key not in used and chosen[key] != option.default
    ]


def build_schedule(config: ml_collections.ConfigDict, plan: Plan) -> optim.Schedule:
    """The learning-rate schedule, with the config's epochs converted to steps."""
    options, steps_per_epoch = config.schedule, plan.steps_per_epoch
    peak = peak_learning_rate(config)
    ignored = ignored_options(config, "schedule")
    if ignored:
        logging.warning("Ignoring options of other schedules: %s.", ", ".join(ignored))
    warmup_steps = round(options.warmup_epochs * steps_per_epoch)
    if warmup_steps >= plan.total_steps:
        raise ConfigError(
            f"schedule.warmup_epochs = {options.warmup_epochs} ({warmup_steps} steps) covers the "
            f"whole run of {plan.total_steps} steps: lower it below "
            f"{plan.total_steps / steps_per_epoch:g} epochs."
        )
    in_steps = optim.SCHEDULES[options.name].to_steps(options, peak, steps_per_epoch)
    return optim.make_schedule(
        options.name, peak, plan.total_steps, warmup_steps=warmup_steps, **in_steps
    )


def build_optimizer(
    config: ml_collections.ConfigDict, schedule: optim.Schedule, frozen_stages: int
) -> optax.GradientTransformation:
    """The optimizer; with frozen stages, their parameters get no updates and no state."""
    options = config.optimizer
    ignored = ignored_options(config, "optimizer")
    if ignored:
        logging.warning("Ignoring options of other optimizers: %s.", ", ".join(ignored))
    tx = optim.make_optimizer(
        options.name,
        schedule,
        weight_decay=options.weight_decay,
        decay_all_params=options.decay_all_params,
        grad_clip_norm=options.grad_clip_norm,
        **{option.key: options[option.key] for option in optim.OPTIMIZERS[options.name].options},
    )
    if frozen_stages < 0:
        return tx

    def is_frozen(path: tuple[str, ...]) -> bool:
        stage = models.stage_of(path)
        return stage is not None and stage <= frozen_stages  # the head (None) always trains

    return optim.freeze(tx, is_frozen)


def pretrained_variables(
    config: ml_collections.ConfigDict, model: models.ResNet, input_shape: tuple[int, ...]
) -> dict[str, Any] | None:
    """The variables to start from: model.pretrained's weights where they fit (None: scratch)."""
    if not config.model.pretrained:
        return None
    from resnet_jax import convert  # reads torch files; not needed otherwise

    # Layers the weights do not cover (e.g. a head for another number of classes) keep this init.
    init = jax.jit(functools.partial(model.init, train=False))
    fresh = init(jax.random.key(config.seed), jnp.zeros(input_shape, jnp.float32))
    try:
        variables, report = convert.load_pretrained(
            fresh, config.model.pretrained, config.model.name
        )
    except UserError:
        raise  # convert's own errors explain themselves
    except Exception as error:  # torch/safetensors' own errors for a file that is not weights
        reason = " ".join(str(error).split())[:200]
        raise ConfigError(
            f"Cannot read model.pretrained = {config.model.pretrained!r} ({type(error).__name__}: "
            f"{reason}). Give a torchvision .pth or .safetensors file, or a `python -m "
            'resnet_jax.convert` output directory; "" trains from scratch.'
        ) from None
    logging.info("%s", report.summary())
    convert.check_frozen_layers_loaded(
        report, model.frozen_stages, config.model.freeze_random_layers
    )
    return variables


def create_state(
    config: ml_collections.ConfigDict,
    model: models.ResNet,
    tx: optax.GradientTransformation,
    input_shape: tuple[int, ...],
    variables: dict[str, Any] | None = None,
) -> ts.TrainState:
    """A TrainState on the host: `variables`, or a fresh initialization from config.seed (with an
    EMA of the weights when ema.decay > 0)."""
    return ts.create(
        model,
        tx,
        jax.random.key(config.seed),
        input_shape,
        variables=variables,
        ema=config.ema.decay > 0,
    )


def build_train_step(
    config: ml_collections.ConfigDict,
    preprocess: augment.Preprocess,
    schedule: optim.Schedule,
    axis_name: str | None,
) -> ts.TrainStep:
    """The config's train step: the preprocessing, mixing, label smoothing, schedule, gradient
    accumulation and EMA it names, averaged over `axis_name` under pmap."""
    return ts.TrainStep(
        preprocess=preprocess,
        mix=build_mix(config),
        label_smoothing=config.label_smoothing,
        learning_rate_fn=schedule,
        grad_accumulation_steps=config.optimizer.grad_accumulation_steps,
        ema_decay=config.ema.decay,
        ema_warmup=config.ema.warmup,
        axis_name=axis_name,
    )


def compile_steps(
    par: parallel.Parallel,
    state: ts.TrainState,
    train_step: ts.TrainStep,
    eval_step: ts.EvalStep,
    plan: Plan,
    image_shape: tuple[int, ...],
) -> tuple[Any, Any]:
    """The train and eval steps compiled ahead of time (from the cache on reruns), timed."""
    start = time.perf_counter()

    def example_batch(global_size: int, *, with_mask: bool) -> dict[str, jax.Array]:
        size = global_size // jax.process_count()
        batch = {
            "image": np.zeros((size, *image_shape), np.uint8),
            "label": np.zeros(size, np.int32),
        }
        if with_mask:
            batch["mask"] = np.ones(size, bool)
        return par.shard_batch(batch)

    train_batch = example_batch(plan.batch_size, with_mask=False)
    eval_batch = example_batch(plan.eval_batch_size, with_mask=True)
    compiled_train = par.precompile(par.compile_train_step(train_step), state, train_batch)
    compiled_eval = par.precompile(par.compile_eval_step(eval_step), state.variables, eval_batch)
    logging.info("Compiled the train and eval steps in %.1f s.", time.perf_counter() - start)
    return compiled_train, compiled_eval
