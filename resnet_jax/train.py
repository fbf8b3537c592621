"""Training: `train_and_evaluate(config, workdir)` and its command line.

    python -m resnet_jax.train --config configs/r50.py --workdir workdir/r50 [--config.KEY=VALUE]

A run validates its config, loads the dataset into host memory, builds the model, schedule and
optimizer the config names, compiles the train and eval steps once, then for each epoch trains
(metrics stay on the device until every `log_every_steps`), evaluates on the validation split and
saves a checkpoint. At the end the best checkpoint by validation accuracy is evaluated on the test
split (results.json). Rerunning the same command on the same workdir resumes from the latest
checkpoint exactly (same step, optimizer state, rng and batch order); a finished run only reports.

Exit status: 0 done; 1 a mistake the message explains (bad config, missing data, ...); 130 or 143
stopped by SIGINT or SIGTERM after saving a checkpoint (128 + the signal number, as shells and
schedulers report a signal), so rerun the command to resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags
from tqdm import tqdm

from resnet_jax import augment, checkpoint, config_utils, data, metrics, models, optim, parallel
from resnet_jax import train_state as ts
from resnet_jax.config_utils import ConfigError
from resnet_jax.reporting import RESULTS_FILE, Reporter, read_results

# The optimizer and schedule options in the config, by the name that uses each (the rest are
# logged as ignored if changed). Optimizer options are named as optim.make_optimizer's.
OPTIMIZER_KEYS = {name: set(options) for name, options in optim.OPTIMIZER_OPTIONS.items()}
SCHEDULE_KEYS = {
    "constant": set(),
    "cosine": {"final_lr_fraction"},
    "step": {"boundaries_epochs", "decay_factor"},
    "exponential": {"decay_rate", "decay_epochs"},
    "time_based": {"decay_per_epoch"},
}
REFERENCE_BATCH_SIZE = 128  # optimizer.learning_rate is the rate for this many images
# Config keys that make a run what it is: a workdir's checkpoints only resume a run that agrees.
RUN_IDENTITY_KEYS = ("model.", "dataset.name", "dataset.image_size", "dataset.val_fraction",
                     "batch_size", "seed")  # fmt: skip


class Interrupted(Exception):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint at `step`."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"Stopped by {signal.Signals(signum).name} at step {step}.")
        self.signum = signum
        self.step = step


class DivergedError(ValueError):
    """The training loss or the parameters became NaN or infinite (in `epoch`, 1-based)."""

    def __init__(self, message: str, epoch: int | None = None):
        super().__init__(message)
        self.epoch = epoch


# --- From a config to the objects of a run ---------------------------------------------------


def enable_compilation_cache(directory: str) -> None:
    """JAX's persistent compilation cache in `directory` ("" turns it off)."""
    if not directory:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    path = Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # The default (1 s) would skip small models' steps; tiny helper jits stay out at 0.1 s.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


def load_dataset(config: ml_collections.ConfigDict) -> data.Dataset:
    """The config's dataset with its splits in host memory."""
    return data.load(
        config.dataset.name,
        config.dataset.data_dir or None,
        image_size=config.dataset.image_size or None,
        val_fraction=config.dataset.val_fraction,
        seed=config.seed,
        verify_checksums=config.dataset.verify_checksums,
    )


@dataclasses.dataclass(frozen=True)
class Plan:
    """How long a run is, in the reports' terms: an epoch is train examples // batch size steps."""

    num_train_examples: int
    batch_size: int
    steps_per_epoch: int
    num_epochs: int
    total_steps: int


def make_plan(config: ml_collections.ConfigDict, num_train_examples: int) -> Plan:
    """Epochs and steps: num_steps > 0 overrides num_epochs, cutting the last epoch short."""
    steps_per_epoch = data.steps_per_epoch(num_train_examples, config.batch_size)
    total_steps = config.num_steps or config.num_epochs * steps_per_epoch
    return Plan(
        num_train_examples=num_train_examples,
        batch_size=config.batch_size,
        steps_per_epoch=steps_per_epoch,
        num_epochs=math.ceil(total_steps / steps_per_epoch),
        total_steps=total_steps,
    )


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
    num_stages = models.num_stages(models.get_model(name))
    return models.get_model(
        name,
        num_classes,
        stem=config.model.stem if has_stem_choice else None,
        shortcut=config.model.shortcut or None,
        residual=config.model.residual,
        width=config.model.width or None,
        zero_init_residual=config.model.zero_init_residual,
        frozen_stages=config_utils.frozen_stages(config, num_stages),
        dtype=jnp.bfloat16 if config.half_precision else jnp.float32,
        axis_name=axis_name,
    )


def normalization_stats(config: ml_collections.ConfigDict) -> tuple[tuple[float, ...], ...]:
    """(mean, std) per channel: CIFAR-10's for CIFAR-10 from scratch, ImageNet's for pretrained
    weights (which expect them) and other datasets, unless augment.normalization names one."""
    choice = config.augment.normalization
    if choice == "auto":
        from_scratch_on_cifar10 = config.dataset.name == "cifar10" and not config.model.pretrained
        choice = "cifar10" if from_scratch_on_cifar10 else "imagenet"
    if choice == "cifar10":
        return augment.CIFAR10_MEAN, augment.CIFAR10_STD
    return augment.IMAGENET_MEAN, augment.IMAGENET_STD


def build_preprocess(
    config: ml_collections.ConfigDict, image_shape: tuple[int, int, int]
) -> tuple[augment.Preprocess, tuple[int, ...]]:
    """The on-device augment + normalize function, and the model input shape it produces."""
    height, width, channels = image_shape
    options = config.augment
    if channels != 3:
        raise ConfigError(
            f"The images of {config.dataset.name} have {channels} channel(s), but the models and "
            "the normalization statistics are RGB: use an RGB dataset (image folders are "
            "converted to RGB on load)."
        )
    if options.crop_size > min(height, width) + 2 * options.crop_padding:
        raise ConfigError(
            f"augment.crop_size = {options.crop_size} is larger than the {height}x{width} images "
            f"padded by augment.crop_padding = {options.crop_padding}: set crop_size to at most "
            f"{min(height, width) + 2 * options.crop_padding} (or 0 for the image size)."
        )
    mean, std = normalization_stats(config)
    preprocess = augment.make_preprocess(
        mean=mean,
        std=std,
        crop_padding=options.crop_padding,
        crop_size=options.crop_size or None,
        flip=options.flip,
        rotation=options.rotation,
        cutout_size=options.cutout,
        resize_to=options.resize_to or None,
    )
    images = jax.ShapeDtypeStruct((1, height, width, channels), jnp.uint8)
    return preprocess, jax.eval_shape(preprocess, images).shape


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
    """optimizer.learning_rate, scaled linearly from a batch of 128 to the run's batch size."""
    return config.optimizer.learning_rate * config.batch_size / REFERENCE_BATCH_SIZE


def build_schedule(config: ml_collections.ConfigDict, plan: Plan) -> optim.Schedule:
    """The learning-rate schedule, with the config's epochs converted to steps."""
    options, steps_per_epoch = config.schedule, plan.steps_per_epoch
    peak = peak_learning_rate(config)
    ignored = config_utils.ignored_options(
        config,
        "schedule",
        sorted(set().union(*SCHEDULE_KEYS.values())),
        SCHEDULE_KEYS[options.name],
    )
    if ignored:
        logging.warning("Ignoring options of other schedules: %s.", ", ".join(ignored))
    warmup_steps = round(options.warmup_epochs * steps_per_epoch)
    if warmup_steps >= plan.total_steps:
        raise ConfigError(
            f"schedule.warmup_epochs = {options.warmup_epochs} ({warmup_steps} steps) covers the "
            f"whole run of {plan.total_steps} steps: lower it below "
            f"{plan.total_steps / steps_per_epoch:g} epochs."
        )
    schedule_options = {
        "constant": {},
        "cosine": {"final_lr": options.final_lr_fraction * peak},
        "step": {
            "boundaries": [round(e * steps_per_epoch) for e in options.boundaries_epochs] or None,
            "decay_factor": options.decay_factor,
        },
        "exponential": {
            "decay_rate": options.decay_rate,
            "decay_steps": round(options.decay_epochs * steps_per_epoch) or None,
        },
        "time_based": {"decay": options.decay_per_epoch / steps_per_epoch},
    }[options.name]
    return optim.make_schedule(
        options.name, peak, plan.total_steps, warmup_steps=warmup_steps, **schedule_options
    )


def build_optimizer(
    config: ml_collections.ConfigDict, schedule: optim.Schedule, frozen_stages: int
) -> optax.GradientTransformation:
    """The optimizer; with frozen stages, their parameters get no updates and no state."""
    options = config.optimizer
    used = OPTIMIZER_KEYS[options.name]
    ignored = config_utils.ignored_options(
        config, "optimizer", sorted(set().union(*OPTIMIZER_KEYS.values())), used
    )
    if ignored:
        logging.warning("Ignoring options of other optimizers: %s.", ", ".join(ignored))
    tx = optim.make_optimizer(
        options.name,
        schedule,
        weight_decay=options.weight_decay,
        decay_all_params=options.decay_all_params,
        grad_clip_norm=options.grad_clip_norm,
        **{key: options[key] for key in used},
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
    except Exception as error:  # torch/safetensors' own errors for a file that is not weights
        if config_utils.is_user_error(error):
            raise
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
    schedule: optim.Schedule,
    preprocess: augment.Preprocess,
    input_shape: tuple[int, ...],
    variables: dict[str, Any] | None = None,
) -> ts.TrainState:
    """A TrainState on the host: `variables`, or a fresh initialization from config.seed."""
    return ts.create(
        model,
        tx,
        jax.random.key(config.seed),
        input_shape,
        variables=variables,
        preprocess=preprocess,
        label_smoothing=config.label_smoothing,
        learning_rate_fn=schedule,
    )


# --- The loop's parts ------------------------------------------------------------------------


class StopSignal:
    """Turns SIGTERM/SIGINT into a request to save at the next step boundary and exit.

    A second signal gets the default behaviour back (exit at once; checkpoints on disk are never
    half-written). With several processes, they agree on stopping only at `sync` points (log
    steps and epoch ends), where all of them are.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # else Python cannot catch them
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.signum = signum
        self.__exit__()
        logging.warning(
            "Got %s: saving a checkpoint at the next step boundary, then exiting (send it "
            "again to exit at once).",
            signal.Signals(signum).name,
        )

    def requested(self, sync: bool) -> bool:
        """Whether to stop now; `sync` marks points every process reaches together."""
        if jax.process_count() == 1:
            return self.signum is not None
        if not sync:
            return False
        signums = multihost_utils.process_allgather(np.int32(self.signum or 0))
        self.signum = self.signum or int(np.max(signums)) or None
        return self.signum is not None


class LossNotFinite(Exception):
    """The `what` (the training loss, or the variables) was `value` (NaN or inf) at `step`."""

    def __init__(self, what: str, value: float, step: int):
        super().__init__(what, value, step)
        self.what, self.value, self.step = what, value, step


class TrainMetrics:
    """Training metrics of the steps since the last log, left on the device until `flush`."""

    def __init__(self, fetch: Any, reporter: Reporter, plan: Plan, bar: tqdm):
        self._fetch, self._reporter, self._plan, self._bar = fetch, reporter, plan, bar
        self._pending: list[tuple[int, dict[str, jax.Array]]] = []
        self.epoch_sums = {"loss": 0.0, "accuracy": 0.0, "steps": 0}
        self._clock = time.perf_counter()

    def start_epoch(self, sums: dict[str, float] | None = None) -> None:
        """Begin an epoch's means (from a checkpoint's partial sums when resuming mid-epoch)."""
        self.epoch_sums = dict(sums) if sums else {"loss": 0.0, "accuracy": 0.0, "steps": 0}
        self._clock = time.perf_counter()  # evaluation time is not training throughput

    def add(self, step: int, step_metrics: dict[str, jax.Array]) -> None:
        """Keep the metrics of step `step` (0-based) without waiting for the device."""
        self._pending.append((step, step_metrics))

    def flush(self) -> None:
        """Fetch the pending metrics (one device sync), check them, log a step record."""
        if not self._pending:
            return
        steps = [step for step, _ in self._pending]
        rows = self._fetch([m for _, m in self._pending])
        self._pending = []
        losses = np.array([row["loss"] for row in rows], dtype=np.float64)
        not_finite = np.flatnonzero(~np.isfinite(losses))
        if not_finite.size:
            first = not_finite[0]
            raise LossNotFinite("training loss", float(losses[first]), steps[first] + 1)
        accuracy = float(np.sum([row["accuracy"] for row in rows]))
        self.epoch_sums["loss"] += float(losses.sum())
        self.epoch_sums["accuracy"] += accuracy
        self.epoch_sums["steps"] += len(rows)
        now = time.perf_counter()
        images_per_second = len(rows) * self._plan.batch_size / max(now - self._clock, 1e-9)
        self._clock = now
        done = steps[-1] + 1
        record = {
            "record": "step",
            "step": done,
            "epoch": done / self._plan.steps_per_epoch,
            "train_loss": float(losses.mean()),
            "train_accuracy": accuracy / len(rows),
            "learning_rate": float(rows[-1]["learning_rate"]),
            "images_per_second": images_per_second,
        }
        self._reporter.write(record)
        self._bar.set_postfix(
            loss=f"{record['train_loss']:.4f}",
            acc=f"{record['train_accuracy']:.2%}",
            lr=f"{record['learning_rate']:.3g}",
            img_s=f"{images_per_second:,.0f}",
            refresh=False,
        )

    def epoch_means(self) -> dict[str, float]:
        steps = max(self.epoch_sums["steps"], 1)
        return {
            "train_loss": self.epoch_sums["loss"] / steps,
            "train_accuracy": self.epoch_sums["accuracy"] / steps,
        }


def evaluate(
    eval_step: Any, state: ts.TrainState, split: data.Split, par: parallel.Parallel, batch_size: int
) -> dict[str, Any]:
    """Exact loss, accuracy and confusion matrix over a split (sums stay on the device)."""
    totals = None
    batches = data.eval_batches(
        split, batch_size, process_index=jax.process_index(), process_count=jax.process_count()
    )
    for batch in batches:
        out = eval_step(state, par.shard_batch(batch))
        sums = {key: out[key] for key in ("loss_sum", "correct", "count", "confusion")}
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = par.fetch(totals)
    count = float(totals["count"])
    return {
        "loss": float(totals["loss_sum"]) / count,
        "accuracy": float(totals["correct"]) / count,
        "confusion": np.asarray(totals["confusion"], np.int64),
        "count": int(count),
    }


def summarize_test(evaluation: dict[str, Any], class_names: list[str]) -> dict[str, Any]:
    """results.json's figures from `evaluate` on the test split."""
    report = metrics.classification_report(evaluation["confusion"], class_names)
    return {
        "test_loss": evaluation["loss"],
        "test_accuracy": report.pop("accuracy"),
        "num_test_examples": report.pop("num_examples"),
        **report,
    }


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def check_run_identity(
    saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, workdir: Path
) -> None:
    """Refuse to resume a workdir's run with a config that makes a different run."""
    old, new = config_utils.flatten(saved), config_utils.flatten(config)
    differ = [
        key
        for key in new
        if key.startswith(RUN_IDENTITY_KEYS)
        and key != "model.pretrained"
        and old.get(key) != new[key]
    ]
    if differ:
        changes = ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in differ)
        raise ConfigError(
            f"The workdir {workdir} holds a run of {saved.model.name} on {saved.dataset.name} "
            f"that this config would not continue ({changes}). Use a new --workdir for the new "
            "run, or rerun with the workdir's own settings (its config.json) to resume it."
        )
    changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
    if changed:
        logging.warning("Resuming with changed settings: %s.", "; ".join(changed))


# --- The run ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """What one training run is made of, built once from its config."""

    config: ml_collections.ConfigDict
    workdir: Path
    par: parallel.Parallel
    dataset: data.Dataset
    plan: Plan
    schedule: optim.Schedule
    input_shape: tuple[int, ...]
    checkpoints: checkpoint.Checkpoints
    reporter: Reporter
    train_step: Any  # compiled
    eval_step: Any  # compiled

    @property
    def eval_split_name(self) -> str:
        """Where each epoch is evaluated: "val", or "test" when there is no validation split."""
        return "val" if self.dataset.val is not None else "test"

    @property
    def eval_split(self) -> data.Split:
        return self.dataset.val if self.dataset.val is not None else self.dataset.test


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Train per `config` in `workdir`, resuming what is there, and return the test results.

    Raises ConfigError, data.DataError, parallel.ParallelError, ... for what the user can fix,
    DivergedError if the loss or parameters become NaN/inf, and Interrupted on SIGTERM/SIGINT
    (after saving a checkpoint).
    """
    parallel.check_processes_agree(config, workdir)
    config = config_utils.resolve(config)
    workdir = prepare_workdir(workdir)
    enable_compilation_cache(config.compilation_cache_dir)
    # Signals are caught from here on, so one that arrives while compiling stops at step one.
    with workdir_lock(workdir), StopSignal() as stop:
        checkpoints = checkpoint.Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints)
        try:
            results = finished_results(config, workdir, checkpoints)
            if results is not None:
                return results
            run, state = setup(config, workdir, checkpoints)
            try:
                state = train(run, state, stop)
                results = final_results(run, state)
                run.reporter.write_results(results)
            finally:
                run.reporter.close()
            log_results(results)
            return results
        finally:
            checkpoints.close()  # waits for saves in flight: a started save is never lost


LOCK_FILE = ".lock"


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """Hold `workdir/.lock` for the run, so that a second run on the workdir is refused rather
    than interleaving its checkpoints and metrics with this one's. It is an flock: the kernel
    releases it when the process dies, so even a kill -9 leaves no stale lock. (With several
    processes only the main one locks: they share the workdir.)"""
    if not parallel.is_main_process():
        yield
        return
    path = workdir / LOCK_FILE
    try:
        lock = open(path, "a+")  # noqa: SIM115 (held until the run ends)
    except OSError as error:
        raise ConfigError(
            f"Cannot write to --workdir {workdir}: {error.strerror or error}. Pass a directory "
            "that can be written to."
        ) from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise ConfigError(
                f"Another run is using --workdir {workdir} ({holder} holds {path}). Two runs on "
                "one workdir would overwrite each other's checkpoints: wait for that run to end "
                "(or stop it; its checkpoints are kept), or use another --workdir."
            ) from None
        try:
            lock.truncate(0)
            lock.write(f"process {os.getpid()} on {socket.gethostname()}\n")
            lock.flush()
        except OSError as error:  # a full disk shows first here
            raise ConfigError(
                f"Cannot write to --workdir {workdir}: {error.strerror or error}. Free disk space "
                "or pass another --workdir."
            ) from None
        yield


def prepare_workdir(workdir: str | Path) -> Path:
    """`workdir` as an absolute path, created; a ConfigError if it cannot be."""
    path = Path(workdir).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"Cannot use --workdir {path}: {error.strerror or error}. Pass a directory that can "
            "be created and written to (it need not exist)."
        ) from None
    return path


def finished_results(
    config: ml_collections.ConfigDict, workdir: Path, checkpoints: checkpoint.Checkpoints
) -> dict[str, Any] | None:
    """The results of the workdir's run if it is finished (its config agreeing), else None."""
    newest = checkpoints.latest_meta()
    if newest is None:
        return None
    latest, meta = newest
    check_run_identity(config_utils.resolve(meta["config"]), config, workdir)
    total_steps = make_plan(config, meta["num_train_examples"]).total_steps
    results = read_results(workdir)
    if latest < total_steps or results is None:
        return None
    logging.info(
        "The run in %s is finished (step %d of %d); nothing to train. Its results (%s):",
        workdir, latest, total_steps, workdir / RESULTS_FILE,
    )  # fmt: skip
    log_results(results)
    return results


def setup(
    config: ml_collections.ConfigDict, workdir: Path, checkpoints: checkpoint.Checkpoints
) -> tuple[Run, ts.TrainState]:
    """Data, model, optimizer and compiled steps, and the state: fresh or the latest saved."""
    par = parallel.Parallel(config.parallel)
    try:
        parallel.check_batch_size(config.batch_size, par.num_devices)
        parallel.check_batch_size(config.eval_batch_size, par.num_devices, name="eval_batch_size")
    except parallel.ParallelError as error:
        if checkpoints.latest_step() is None:
            raise
        # A resume cannot take another batch size: it would not continue the same run.
        raise parallel.ParallelError(
            f"{workdir} holds a run with batch_size {config.batch_size} and eval_batch_size "
            f"{config.eval_batch_size}, which do not both divide over the {par.num_devices} "
            "devices here. Resume it on a device count that divides both (or set eval_batch_size "
            "alone), or start a new --workdir with other batch sizes."
        ) from error
    dataset = load_dataset(config)
    plan = make_plan(config, len(dataset.train))
    log_plan(config, dataset, plan, par)

    model = build_model(config, dataset.num_classes, par.axis_name)
    preprocess, input_shape = build_preprocess(config, dataset.image_shape)
    schedule = build_schedule(config, plan)
    tx = build_optimizer(config, schedule, model.frozen_stages)
    new_state = functools.partial(
        create_state, config, model, tx, schedule, preprocess, input_shape
    )
    latest = checkpoints.latest_step()
    if latest is None:
        state, resumed_step = new_state(pretrained_variables(config, model, input_shape)), 0
    else:
        # Restoring needs only the state's shapes: eval_shape skips initializing (and compiling).
        state = restore(checkpoints, latest, par.restore_target(jax.eval_shape(new_state)))
        # A damaged latest checkpoint is set aside for the one before: say which one it is.
        resumed_step = int(jax.device_get(state.step))
        logging.info("Resuming from the checkpoint at step %d.", resumed_step)
    logging.info(
        "Model %s: %s parameters, input %s.",
        config.model.name, f"{models.count_params(state.params):,}", input_shape[1:],
    )  # fmt: skip
    state = par.place_state(state)

    reporter = Reporter(workdir, enabled=parallel.is_main_process())
    reporter.write_config(config_utils.to_json(config))
    reporter.keep_history_until(resumed_step)  # later records are trained again
    train_step, eval_step = compile_steps(par, state, config, dataset.image_shape)
    run = Run(
        config, workdir, par, dataset, plan, schedule, input_shape, checkpoints, reporter,
        train_step, eval_step,
    )  # fmt: skip
    return run, state


def train(run: Run, state: ts.TrainState, stop: StopSignal) -> ts.TrainState:
    """The epochs still to do: train, evaluate, checkpoint. Returns the final state."""
    plan = run.plan
    first_step = int(jax.device_get(run.par.host_state(state).step))
    resumed_sums = run.checkpoints.meta(first_step)["epoch_train_sums"] if first_step else None
    bar = tqdm(
        total=plan.total_steps, initial=first_step, unit="step", dynamic_ncols=True,
        mininterval=1.0, disable=not parallel.is_main_process(),
    )  # fmt: skip
    train_metrics = TrainMetrics(run.par.fetch, run.reporter, plan, bar)
    try:
        for epoch in range(first_step // plan.steps_per_epoch, plan.num_epochs):
            epoch_start = epoch * plan.steps_per_epoch
            steps = range(
                max(first_step, epoch_start),
                min(epoch_start + plan.steps_per_epoch, plan.total_steps),
            )
            if not steps:
                continue  # finished (and evaluated) before a restart
            mid_epoch = steps.start > epoch_start
            train_metrics.start_epoch(resumed_sums if mid_epoch else None)
            bar.set_description(f"epoch {epoch + 1}/{plan.num_epochs}")
            state, stopped_at = train_epoch(run, state, epoch, steps, train_metrics, bar, stop)
            if stopped_at is not None:
                save(run, state, epoch, epoch_train_sums=train_metrics.epoch_sums)
                raise Interrupted(stop.signum, stopped_at)
            end_epoch(run, state, epoch, train_metrics.epoch_means(), stop)
    except LossNotFinite as bad:
        run.checkpoints.wait()
        message = diverged_message(bad, run.config, run.checkpoints.latest_step(), plan)
        raise DivergedError(message, epoch=diverged_epoch(bad, plan)) from None
    finally:
        bar.close()
    return state


def train_epoch(
    run: Run,
    state: ts.TrainState,
    epoch: int,
    steps: range,
    train_metrics: TrainMetrics,
    bar: tqdm,
    stop: StopSignal,
) -> tuple[ts.TrainState, int | None]:
    """Run `steps` (0-based) of `epoch`. Returns the state, and the step count it stopped at if a
    signal asked it to (else None). The epoch's last step never stops: the epoch is evaluated
    first, so a checkpoint at an epoch's end always carries its validation accuracy."""
    batches = data.train_batches(
        run.dataset.train, run.config.batch_size, seed=run.config.seed, epoch=epoch,
        start_step=steps.start - epoch * run.plan.steps_per_epoch,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )  # fmt: skip
    for step, batch in zip(steps, batches, strict=False):
        state, step_metrics = run.train_step(state, run.par.shard_batch(batch))
        train_metrics.add(step, step_metrics)
        bar.update(1)
        log_now = (step + 1) % run.config.log_every_steps == 0
        if log_now:
            train_metrics.flush()
        if step + 1 < steps.stop and stop.requested(sync=log_now):
            train_metrics.flush()
            return state, step + 1
    train_metrics.flush()
    return state, None


def end_epoch(
    run: Run, state: ts.TrainState, epoch: int, train_means: dict[str, float], stop: StopSignal
) -> None:
    """Evaluate, record and log the epoch; checkpoint it when due (or stopping, or last)."""
    evaluation = evaluate(run.eval_step, state, run.eval_split, run.par, run.config.eval_batch_size)
    step = int(jax.device_get(run.par.host_state(state).step))
    split = run.eval_split_name
    record = {
        "record": "epoch",
        "step": step,
        "epoch": epoch + 1,
        "steps_per_epoch": run.plan.steps_per_epoch,  # the last epoch may be cut short
        **train_means,
        f"{split}_loss": evaluation["loss"],
        f"{split}_accuracy": evaluation["accuracy"],
        "learning_rate": float(run.schedule(step - 1)),
    }
    run.reporter.write(record)
    run.reporter.plot_curves()
    with tqdm.external_write_mode():
        logging.info(
            "Epoch %d/%d (step %d): train loss %.4f, accuracy %.2f%%; %s loss %.4f, accuracy "
            "%.2f%%.",
            epoch + 1, run.plan.num_epochs, step, train_means["train_loss"],
            100 * train_means["train_accuracy"], split, evaluation["loss"],
            100 * evaluation["accuracy"],
        )  # fmt: skip
    last = step == run.plan.total_steps
    stopping = stop.requested(sync=True)
    if last or stopping or (epoch + 1) % run.config.checkpoint_every_epochs == 0:
        val_accuracy = evaluation["accuracy"] if split == "val" else None
        save(run, state, epoch + 1, val_accuracy=val_accuracy)
    if stopping and not last:
        raise Interrupted(stop.signum, step)


def save(
    run: Run,
    state: ts.TrainState,
    epoch: int,
    *,
    val_accuracy: float | None = None,
    epoch_train_sums: dict[str, float] | None = None,
) -> None:
    """Start saving `state` (never a NaN one) with what evaluation and prediction need to know.

    `epoch`: the epochs completed; `epoch_train_sums`: a mid-epoch save's partial train sums,
    so that a resumed epoch reports the same means as an uninterrupted one.
    """
    step = int(jax.device_get(run.par.host_state(state).step))
    if not bool(_all_finite(state.variables)):
        raise LossNotFinite("parameters or BatchNorm statistics", math.nan, step)
    meta = {
        "epoch": epoch,
        "step": step,
        "config": run.config.to_dict(),
        "num_train_examples": run.plan.num_train_examples,
        "class_names": run.dataset.class_names,
        "image_shape": list(run.dataset.image_shape),
        "epoch_train_sums": epoch_train_sums,
    }
    run.checkpoints.save(run.par.host_state(state), meta, val_accuracy)


def compile_steps(
    par: parallel.Parallel,
    state: ts.TrainState,
    config: ml_collections.ConfigDict,
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

    train_batch = example_batch(config.batch_size, with_mask=False)
    eval_batch = example_batch(config.eval_batch_size, with_mask=True)
    train_step = par.precompile(par.compile_train_step(), state, train_batch)
    eval_step = par.precompile(par.compile_eval_step(), state, eval_batch)
    logging.info("Compiled the train and eval steps in %.1f s.", time.perf_counter() - start)
    return train_step, eval_step


def restore(checkpoints: checkpoint.Checkpoints, step: int, target: Any) -> ts.TrainState:
    """The checkpoint at `step` (or the newest earlier one if it is damaged), or a ConfigError if
    its arrays do not fit this config's state."""
    try:
        return checkpoints.restore(step, target)
    except checkpoint.CheckpointError:
        raise  # damaged, with no earlier checkpoint: it explains itself
    except (ValueError, KeyError) as error:
        reason = " ".join(str(error).split())[:300]
        raise ConfigError(
            f"The checkpoint at step {step} in {checkpoints.directory} does not fit the state "
            f"this config builds ({reason}). Settings that shape the optimizer state "
            "(optimizer.name, optimizer.momentum 0 or not, weight_decay 0 or not, grad_clip_norm, "
            "model.freeze) must match the run's config.json; or use a new --workdir."
        ) from None


def chosen_checkpoint(checkpoints: checkpoint.Checkpoints) -> tuple[int, str]:
    """The checkpoint to report: the best by validation accuracy, or (without a validation
    split) the latest, since picking by test accuracy would overstate it. Returns (step, why)."""
    best = checkpoints.best_step()
    if best is not None:
        return best, "best validation accuracy"
    return checkpoints.latest_step(), "latest (no validation split to pick the best)"


def final_results(run: Run, state: ts.TrainState) -> dict[str, Any]:
    """results.json: the chosen checkpoint's figures on the test split."""
    run.checkpoints.wait()
    step, why = chosen_checkpoint(run.checkpoints)
    state = run.par.place_state(
        run.checkpoints.restore(step, run.par.restore_target(run.par.host_state(state)))
    )
    step = int(jax.device_get(run.par.host_state(state).step))  # an earlier one if it was damaged
    epoch = run.checkpoints.meta(step)["epoch"]
    logging.info("Testing the checkpoint at step %d (epoch %d, %s).", step, epoch, why)
    evaluation = evaluate(
        run.eval_step, state, run.dataset.test, run.par, run.config.eval_batch_size
    )
    return {
        **summarize_test(evaluation, run.dataset.class_names),
        "checkpoint_step": step,
        "checkpoint_epoch": epoch,
        "checkpoint_selection": why,
        "model": run.config.model.name,
        "dataset": run.config.dataset.name,
    }


def diverged_epoch(bad: LossNotFinite, plan: Plan) -> int:
    """The (1-based) epoch of the step at which training diverged."""
    return (bad.step - 1) // plan.steps_per_epoch + 1


def diverged_message(
    bad: LossNotFinite, config: ml_collections.ConfigDict, latest: int | None, plan: Plan
) -> str:
    """One paragraph: where training diverged, what was kept, and what to change."""
    kept = (
        f"The last good checkpoint (step {latest}) stays the latest"
        if latest is not None
        else "No checkpoint had been saved yet"
    )
    return (
        f"Training diverged: the {bad.what} became {bad.value} at step {bad.step} (epoch "
        f"{diverged_epoch(bad, plan)}). {kept}, and no results.json was written. "
        f"Lower optimizer.learning_rate (now {config.optimizer.learning_rate:g} per "
        f"{REFERENCE_BATCH_SIZE} images, a peak of {peak_learning_rate(config):g}), lengthen "
        "schedule.warmup_epochs, set optimizer.grad_clip_norm (e.g. 1.0) or turn off "
        "half_precision, then rerun: the same --workdir resumes from the last good checkpoint."
    )


def log_plan(
    config: ml_collections.ConfigDict, dataset: data.Dataset, plan: Plan, par: parallel.Parallel
) -> None:
    """State the run's data, length and learning rate in the terms the reports use."""
    val = f"{len(dataset.val)} val / " if dataset.val is not None else ""
    logging.info(
        "Dataset %s: %d train / %s%d test examples, %d classes, images %s.",
        config.dataset.name, len(dataset.train), val, len(dataset.test), dataset.num_classes,
        "x".join(map(str, dataset.image_shape)),
    )  # fmt: skip
    if dataset.val is None:
        logging.warning(
            "No validation split (dataset.val_fraction = 0): each epoch is evaluated on the test "
            "split, and the final results come from the last checkpoint, not the best."
        )
    per_device = plan.batch_size // par.num_devices
    dropped = plan.num_train_examples - plan.steps_per_epoch * plan.batch_size
    length = (
        f"{config.num_steps} steps (num_steps; the last epoch cut short)"
        if config.num_steps
        else f"{config.num_epochs} epochs"
    )
    logging.info(
        "Training on %d examples, batch size %d (%d per device on %d %s device(s)): %d steps per "
        "epoch (%d examples dropped per epoch), %d epochs, %d steps in all (%s).",
        plan.num_train_examples, plan.batch_size, per_device, par.num_devices,
        jax.default_backend(), plan.steps_per_epoch, dropped, plan.num_epochs, plan.total_steps,
        length,
    )  # fmt: skip
    logging.info(
        "Learning rate: peak %.4g (optimizer.learning_rate %.4g per %d images x batch %d), %s "
        "schedule, %g warmup epochs.",
        peak_learning_rate(config), config.optimizer.learning_rate, REFERENCE_BATCH_SIZE,
        config.batch_size, config.schedule.name, config.schedule.warmup_epochs,
    )  # fmt: skip


def log_results(results: dict[str, Any]) -> None:
    """The headline test figures."""
    logging.info(
        "Test (checkpoint step %s, epoch %s): loss %.4f, accuracy %.2f%%, macro precision %.4f, "
        "recall %.4f, F1 %.4f over %d examples.",
        results["checkpoint_step"], results["checkpoint_epoch"], results["test_loss"],
        100 * results["test_accuracy"], results["precision"], results["recall"], results["f1"],
        results["num_test_examples"],
    )  # fmt: skip


# --- Command line -----------------------------------------------------------------------------


def define_flags() -> None:
    """The CLI's flags (defined only when run as a program, so importing this module is free)."""
    config_flags.DEFINE_config_file(
        "config", None, "Config file, e.g. configs/r50.py; override keys as --config.KEY=VALUE.",
        lock_config=True,
    )  # fmt: skip
    flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go; rerun to resume.")
    flags.DEFINE_bool(
        "distributed", False, "Join a multi-process run, detecting the cluster (TPU pod, SLURM)."
    )
    flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0.")
    flags.DEFINE_integer("num_processes", None, "Multi-process: how many processes in all.")
    flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
    flags.DEFINE_integer(
        "distributed_timeout", parallel.DEFAULT_JOIN_TIMEOUT_S,
        "Multi-process: seconds to wait for every process to join, then say which is missing.",
    )  # fmt: skip
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
    """The CLI: train, then return the exit status (128 + signal when stopped by one)."""
    if len(argv) > 1:
        raise ConfigError(
            f"Unexpected arguments: {' '.join(argv[1:])}; set config keys as --config.KEY=VALUE."
        )
    by_hand = (flags.FLAGS.coordinator_address, flags.FLAGS.num_processes, flags.FLAGS.process_id)
    if flags.FLAGS.distributed or any(value is not None for value in by_hand):
        parallel.initialize_distributed(
            flags.FLAGS.coordinator_address, flags.FLAGS.num_processes, flags.FLAGS.process_id,
            timeout_s=flags.FLAGS.distributed_timeout,
        )  # fmt: skip
    config = flags.FLAGS.config
    given = config_flags.get_override_values(flags.FLAGS["config"])
    config_utils.epochs_replace_steps(config, given)
    try:
        train_and_evaluate(config, flags.FLAGS.workdir)
    except Interrupted as stopped:
        logging.warning("%s Checkpoint saved; rerun the same command to resume.", stopped)
        return 128 + stopped.signum
    return 0


if __name__ == "__main__":
    define_flags()
    config_utils.run_cli(main)
